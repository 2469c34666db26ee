"""Evaluation of a cell on the fixed evaluation set (the whole validation budget, every token once): loss and every routing metric per MoE block, router
saturation, and at the end the cost metrics (FLOPs, MFU, router latency share) and peak memory."""
from __future__ import annotations

import math
import resource
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from moe_data.batch import Batch
from moe_data.prepare import PreparedData
from moe_data.prepared_pairs import PreparedPairs
from moe_models.analytics import NON_SCALAR, add_sums, difficulty_sums, pearson, saturation, summarize
from moe_models.models.common import LMOutput
from moe_models.routers.compute_target import reached_knob
from workflows.cell.cost_metrics import cost_metrics, measure_peak_tflops, router_latency_share
from workflows.cell.loop import aux_loss_metrics
from workflows.cell.routing_trace import RoutingTrace
from workflows.cell.worker import Worker, all_reduce_sum
from workflows.metric_names import (
    EVAL_LOSS,
    EVAL_MOE,
    EVAL_MOE_DIFFICULTY_CORR,
    EVAL_MOE_DIFFICULTY_ENTROPY_CORR,
    EVAL_MOE_EXPERT_FLOPS_PER_TOKEN,
    EVAL_MOE_KNOB,
    EVAL_MOE_SATURATION,
    EVAL_PERPLEXITY,
    SUMMARY_ROUTER_LATENCY_SHARE,
)
from workflows.study.cells import Cell

EVAL_SEED = 1234  # every cell and every eval sees the same validation pairs (and the same timing batch)


def layer_metrics(prefix: str, moe: dict[int, dict[str, torch.Tensor]]) -> tuple[dict[str, float], dict]:
    """Per-layer routing metrics plus their mean over MoE layers; returns (metrics, per-layer tables), the tables
    being analytics.NON_SCALAR entries (expert fractions, experts-per-token histogram, co-activation)."""
    metrics: dict[str, float] = {}
    tables: dict[int, dict[str, list]] = {}
    per_layer = {i: summarize({k: all_reduce_sum(v) for k, v in sums.items()}) for i, sums in sorted(moe.items())}
    for i, summary in per_layer.items():
        tables[i] = {key: summary.pop(key) for key in NON_SCALAR if key in summary}
        metrics.update({f"{prefix}/block{i}/{k}": v for k, v in summary.items()})
        metrics.update({f"{prefix}/block{i}/expert{e}_fraction": f
                        for e, f in enumerate(tables[i]["expert_fraction"])})
    for key in per_layer[next(iter(per_layer))] if per_layer else []:
        metrics[f"{prefix}/{key}"] = sum(s[key] for s in per_layer.values()) / len(per_layer)
    if per_layer and "expert_flops_per_token" in next(iter(per_layer.values())):  # the model's total, not a mean
        metrics[f"{prefix}/expert_flops_per_token"] = sum(s["expert_flops_per_token"] for s in per_layer.values())
    return metrics, tables


@dataclass
class Evaluation:
    metrics: dict[str, float]
    tables: dict[int, dict[str, list]]  # per MoE block: expert fractions, experts-per-token histogram, co-activation
    routes: dict[int, torch.Tensor]  # per MoE block: this rank's bool (T, E) choices on the fixed eval tokens
    # This rank's mean loss per evaluation sequence (a seq2seq pair: over its summary tokens), in order: every cell
    # sees the same sequences (EVAL_SEED), so the report can pair two cells sequence by sequence (the token level of
    # its two-level bootstrap).
    sequence_losses: list[float]
    trace: RoutingTrace | None = None  # the final evaluation's routing trace, when the study asks for one


def eval_batches(data: PreparedData | PreparedPairs, cell: Cell, w: Worker) -> Iterator[Batch]:
    """The fixed evaluation set, this rank's share. LM data: the whole validation split (its `eval_tokens` budget)
    in consecutive windows, every token a target once, the windows dealt round-robin to the ranks (all ranks run
    the same number of forwards, which expert parallelism's collectives need: up to world_size-1 tail windows are
    left out). Summarization pairs: `eval_batches` micro-batches of pairs drawn with a fixed seed."""
    t = cell.training
    if isinstance(data, PreparedData):
        windows = data.eval_windows("validation", t.seq_len)
        if windows < w.world:
            raise ValueError(f"the validation split holds {windows} windows of seq_len={t.seq_len}, fewer than the "
                             f"{w.world} workers (raise datasets[].eval_tokens)")
        mine = list(range(w.rank, windows - windows % w.world, w.world))
        for lo in range(0, len(mine), t.micro_batch_size):
            yield data.eval_batch("validation", mine[lo:lo + t.micro_batch_size], t.seq_len)
        return
    gen = torch.Generator().manual_seed(EVAL_SEED + w.rank)
    for _ in range(t.eval_batches):
        yield data.sample("validation", t.micro_batch_size, gen, t.seq_len, t.target_len)


@torch.no_grad()
def evaluate(engine, data: PreparedData | PreparedPairs, cell: Cell, w: Worker, trace_tokens: int = 0) -> Evaluation:
    """`trace_tokens`: trace the routing of this rank's first tokens (LM data)."""
    engine.eval()
    trace = RoutingTrace(trace_tokens) if trace_tokens and isinstance(data, PreparedData) else None
    loss_sum, sums, difficulty, routes = torch.zeros(2), {}, None, {}  # routes: block -> per-batch masks
    by_example = None  # experts per token against predictive entropy, both averaged per sequence
    sequence_losses: list[torch.Tensor] = []
    unscaled: dict[int, dict[str, float]] = {}
    num_batches = 0
    for batch in eval_batches(data, cell, w):
        batch = batch.to(engine.device)
        num_batches += 1
        out: LMOutput = engine(*batch.inputs)
        loss_sum += torch.tensor([out.lm_loss.item() * batch.num_targets, batch.num_targets])
        if out.sequence_nll_B is not None:
            sequence_losses.append(out.sequence_nll_B.float().cpu())
        target_blocks = [i for i in out.moe if out.target_blocks is None or i in out.target_blocks]
        if target_blocks:  # experts per token, averaged over the MoE layers the loss's tokens pass, against its loss
            experts_T = torch.stack([out.moe[i].expert_mask_TE.sum(-1) for i in target_blocks]).float().mean(0)
            difficulty = add_sums(difficulty, difficulty_sums(experts_T, out.token_nll_BS.flatten()))
            entropy_BS = out.token_entropy_BS
            if entropy_BS is not None and entropy_BS.numel() == experts_T.numel():
                by_example = add_sums(by_example, difficulty_sums(experts_T.view_as(entropy_BS).mean(1),
                                                                  entropy_BS.mean(1)))
        if trace is not None and not trace.full:
            trace.add(batch.inputs, out.moe)
        for i, aux in out.moe.items():
            sums[i] = add_sums(sums.get(i), aux.sums)
            routes.setdefault(i, []).append(aux.expert_mask_TE.cpu())  # kept to the end, and checkpointed
            for name, value in aux.unscaled.items():  # rank 0's sum over batches (a mean below); load metrics are global
                layer = unscaled.setdefault(i, {})
                layer[name] = layer.get(name, 0.0) + value.item()
    engine.train()
    total = all_reduce_sum(loss_sum)
    loss = float(total[0] / total[1])
    metrics, tables = layer_metrics(EVAL_MOE, sums)
    unscaled = {i: {name: v / num_batches for name, v in layer.items()} for i, layer in unscaled.items()}
    metrics.update(aux_loss_metrics(EVAL_MOE, unscaled, cell.router.balancing))
    metrics.update({EVAL_LOSS: loss, EVAL_PERPLEXITY: math.exp(min(loss, 50.0))})
    if (knob := reached_knob(engine.module)) is not None:  # a router trained at a target compute
        metrics[EVAL_MOE_KNOB] = knob
    if difficulty is not None:  # Pearson r; NaN (not logged) for fixed-k routers
        metrics[EVAL_MOE_DIFFICULTY_CORR] = pearson({k: all_reduce_sum(v) for k, v in difficulty.items()})
    if by_example is not None:  # the report's form: per example, experts per token against predictive entropy
        metrics[EVAL_MOE_DIFFICULTY_ENTROPY_CORR] = pearson({k: all_reduce_sum(v) for k, v in by_example.items()})
    return Evaluation(metrics, tables, {i: torch.cat(masks) for i, masks in routes.items()},
                      torch.cat(sequence_losses).tolist() if sequence_losses else [], trace)


def saturation_metrics(snapshot: dict[int, torch.Tensor], final: dict[int, torch.Tensor]) -> dict[str, float]:
    """Router saturation of an earlier evaluation against the final one, per MoE block and mean (rank 0's tokens)."""
    per_block = {i: saturation(snapshot[i], final[i]) for i in final}
    return {**{f"{EVAL_MOE}/block{i}/saturation": v for i, v in per_block.items()},
            EVAL_MOE_SATURATION: sum(per_block.values()) / len(per_block)} if per_block else {}


def final_cost_metrics(engine, data: PreparedData | PreparedPairs, cell: Cell, tokens_per_s_per_device: float,
                       latest_eval: dict[str, float], step_seconds: float) -> dict[str, float]:
    """FLOPs/token, TFLOP/s, MFU against this device's measured peak, router latency share (every rank runs the
    timed forwards: with expert parallelism they hold collectives)."""
    model = engine.module
    param = next(model.parameters())
    metrics = cost_metrics(model, cell.training.seq_len, tokens_per_s_per_device,
                           latest_eval.get(EVAL_MOE_EXPERT_FLOPS_PER_TOKEN, 0.0),
                           measure_peak_tflops(param.device, param.dtype), step_seconds)
    batch = timing_batch(data, cell, engine.device)
    engine.eval()
    share = router_latency_share(model, lambda: engine(*batch.inputs))
    engine.train()
    return {**metrics, **({SUMMARY_ROUTER_LATENCY_SHARE: share} if share is not None else {})}


def timing_batch(data: PreparedData | PreparedPairs, cell: Cell, device) -> Batch:
    """The evaluation micro-batch every cell of a study times its forwards on (router share, inference cost)."""
    t = cell.training
    return data.sample("validation", t.micro_batch_size, torch.Generator().manual_seed(EVAL_SEED), t.seq_len,
                       t.target_len).to(device)


def reset_peak_memory() -> None:
    """Start the peak-memory measure at this cell: Ray may hand a cell a worker process that ran other tasks (data
    preparation, an earlier trial), whose peak would otherwise be reported as the cell's."""
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # Linux: resets the process's RSS high-water mark (VmHWM)
    except OSError:
        pass  # elsewhere the peak stays the process's lifetime peak


def peak_memory_mb() -> float:
    """Peak accelerator memory where there is one, else this worker process's peak resident set size since
    `reset_peak_memory` (Linux's VmHWM; the lifetime peak, ru_maxrss, where /proc is not there)."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        status = Path("/proc/self/status").read_text()
        return int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB
