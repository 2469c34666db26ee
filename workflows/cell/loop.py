"""One optimizer step of a cell, the data order it follows, and the wall times of its steps."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_data.prepare import PreparedData
from moe_data.prepared_pairs import PreparedPairs
from moe_models.models.common import LMOutput
from moe_models.optimizer_hooks import after_optimizer_step
from workflows.cell.worker import Worker, all_reduce_sum
from workflows.metric_names import (
    TRAIN_AUX_LOSS,
    TRAIN_LM_LOSS,
    TRAIN_LOSS,
    TRAIN_LOSS_SCALE,
    TRAIN_LR,
    TRAIN_MOE,
    TRAIN_SKIPPED_STEPS,
)
from workflows.study.cells import Cell


class NonFiniteLoss(RuntimeError):
    pass


def batch_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Data order is a pure function of (seed, step, global micro-batch index): resuming replays exactly, and
    W ranks x A accumulation steps see the same batches as 1 rank x W*A steps (index = micro * W + rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + index)


def aux_loss_metrics(prefix: str, unscaled: dict[int, dict[str, float]], coefficients: dict[str, float]) -> dict:
    """Each balancing loss per MoE block, unscaled and scaled by its study-file coefficient."""
    out = {}
    for i, losses in unscaled.items():
        for name, value in losses.items():
            out[f"{prefix}/block{i}/{name}_unscaled"] = value
            out[f"{prefix}/block{i}/{name}_scaled"] = coefficients[name] * value
    return out


def train_step(engine, data: PreparedData | PreparedPairs, cell: Cell, step: int, w: Worker) -> dict[str, float]:
    t = cell.training
    # Losses stay tensors until the step ends: one host read per step, not one per loss, layer and micro-batch.
    lm, aux = torch.zeros(()), torch.zeros(())
    unscaled: dict[int, dict[str, torch.Tensor]] = {}
    for micro in range(t.grad_accum_steps):
        gen = batch_generator(cell.seed, step, micro * w.world + w.rank)
        batch = data.sample("train", t.micro_batch_size, gen, t.seq_len, t.target_len, t.batching).to(engine.device)
        out: LMOutput = engine(*batch.inputs)
        loss = out.loss
        if t.inject_nan_at_step == step:
            loss = loss * float("nan")
        # Built on the loss's device: one host read (.item()) per micro-batch, and no host round trip under NCCL.
        bad = all_reduce_sum((~torch.isfinite(loss.detach())).float().reshape(1))
        if bad.item() > 0:
            raise NonFiniteLoss(f"non-finite loss at step {step} (lm {out.lm_loss.item():.4g}, "
                                f"aux {out.aux_loss.item():.4g}) on {int(bad.item())} rank(s)")
        engine.backward(loss)
        engine.step()  # the optimizer steps on the last micro-batch (DeepSpeed's accumulation boundary)
        lm = lm + out.lm_loss.detach() / t.grad_accum_steps
        aux = aux + out.aux_loss.detach() / t.grad_accum_steps
        for i, layer in out.moe.items():
            for name, value in layer.unscaled.items():
                losses = unscaled.setdefault(i, {})
                losses[name] = losses.get(name, 0.0) + value / t.grad_accum_steps
    unscaled_values = {i: {k: v.item() for k, v in losses.items()} for i, losses in unscaled.items()}
    lm, aux = (all_reduce_sum(torch.stack([lm, aux])) / w.world).tolist()  # the global batch's loss, not rank 0's
    after_optimizer_step(engine.module)  # expert bias, balancing windows: once per optimizer step
    metrics = {TRAIN_LOSS: lm + aux, TRAIN_LM_LOSS: lm, TRAIN_AUX_LOSS: aux, TRAIN_LR: engine.get_lr()[0],
               **aux_loss_metrics(TRAIN_MOE, unscaled_values, cell.router.balancing)}
    if t.precision == "fp16":  # dynamic loss scaling: an overflowing step is skipped and the scale halves
        metrics[TRAIN_LOSS_SCALE] = float(engine.optimizer.loss_scale)
        metrics[TRAIN_SKIPPED_STEPS] = engine.skipped_steps
    return metrics


@dataclass
class StepTimes:
    """Wall times of this run's training steps. The first one carries one-off costs (torch.compile, lazy
    initialisation, allocator warm-up), so throughput is measured over the steps after it when there are any."""
    first: float | None = None
    rest: float = 0.0
    rest_count: int = 0

    def add(self, seconds: float) -> None:
        if self.first is None:
            self.first = seconds
        else:
            self.rest += seconds
            self.rest_count += 1

    @property
    def total(self) -> float:
        return (self.first or 0.0) + self.rest

    @property
    def steady_step_seconds(self) -> float:
        return self.rest / self.rest_count if self.rest_count else self.first
