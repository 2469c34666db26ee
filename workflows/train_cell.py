"""The per-worker training function of one cell: runs inside every Ray Train worker.

Flow: build the model and its DeepSpeed engine -> resume from the latest Ray Train checkpoint if there is one ->
train with periodic evaluation -> every `checkpoint_interval` all ranks save DeepSpeed shards and report them to
Ray Train. Rank 0 writes metrics and artifacts to the cell's MLflow run (created by the driver, id in the config).
Sweeps (tuning/) reuse this same function.
"""
from __future__ import annotations

import math
import os
import resource
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import deepspeed
import ray
import ray.train
import torch
import torch.distributed as dist
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_data.prepare import PreparedData, load_prepared
from moe_data.prepared_pairs import PreparedPairs
from moe_models.analytics import NON_SCALAR, add_sums, difficulty_sums, pearson, saturation, summarize
from moe_models.optimizer_hooks import after_optimizer_step
from moe_models.models import MODELS, LMOutput
from workflows import storage
from workflows.cells import Cell
from workflows.cost_metrics import cost_metrics, measure_peak_tflops, router_latency_share
from workflows.heatmap import expert_usage_heatmap, heatmap
from workflows.study import TrainingConfig
from workflows.summarize_cell import generate_summaries, score_and_log
from workflows.tracking import REASON, Tracker

EVAL_SEED = 1234  # every cell and every eval sees the same validation windows


class NonFiniteLoss(RuntimeError):
    pass


@dataclass
class Worker:
    rank: int
    world: int
    tracker: Tracker | None  # rank 0 only
    run_id: str


def lr_factor(step: int, t: TrainingConfig) -> float:
    """Linear warmup, then cosine/linear decay to min_lr_ratio (or constant)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def build_engine(cell: Cell, data: PreparedData | PreparedPairs) -> deepspeed.DeepSpeedEngine:
    torch.manual_seed(cell.seed)  # identical init on every rank
    family = MODELS.get(cell.model.name)
    t = cell.training
    model = family.build(cell.model.resolved_options(), cell.router.routing_spec(), data.vocab_size,
                         max(t.seq_len, t.target_len), cell.seed, num_domains=len(data.domains),
                         token_counts_V=data.train_token_counts())
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": list(model.parameters()), "name": "parameters"})
    optimizer = torch.optim.AdamW(groups, lr=t.lr, betas=t.adam_betas, eps=t.adam_eps,
                                  weight_decay=t.weight_decay)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: lr_factor(s, t))
    ds_config = {
        "train_micro_batch_size_per_gpu": t.micro_batch_size,
        "gradient_accumulation_steps": t.grad_accum_steps,
        "gradient_clipping": t.grad_clip,
        "zero_optimization": {"stage": t.zero_stage},
        "bf16": {"enabled": t.precision == "bf16"},
        "fp16": {"enabled": t.precision == "fp16", "loss_scale": 0,  # 0: dynamic
                 "initial_scale_power": t.fp16_initial_scale_power},
        "steps_per_print": 10**9,
    }
    # On a GPU, the device Ray Train made current (ray.train.torch.get_device()); DeepSpeed would otherwise take
    # cuda:LOCAL_RANK, which need not be the GPU Ray assigned to this worker.
    args = SimpleNamespace(device_rank=torch.cuda.current_device()) if torch.cuda.is_available() else None
    engine, *_ = deepspeed.initialize(args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                      config=ds_config)
    if t.compile:
        engine.compile()  # the module's forward only; encode/decode for generation stay eager
    return engine


def batch_generator(seed: int, step: int, index: int) -> torch.Generator:
    """Data order is a pure function of (seed, step, global micro-batch index): resuming replays exactly, and
    W ranks x A accumulation steps see the same batches as 1 rank x W*A steps (index = micro * W + rank)."""
    return torch.Generator().manual_seed((seed * 1_000_003 + step) * 100_003 + index)


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. NCCL reduces device tensors only: a host tensor goes there and back."""
    if dist.is_initialized() and dist.get_world_size() > 1:
        if dist.get_backend() == "nccl" and not t.is_cuda:
            return all_reduce_sum(t.cuda()).to(t.device)
        dist.all_reduce(t)
    return t


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


def aux_loss_metrics(prefix: str, unscaled: dict[int, dict[str, float]], coefficients: dict[str, float]) -> dict:
    """Each balancing loss per MoE block, unscaled and scaled by its study-file coefficient."""
    out = {}
    for i, losses in unscaled.items():
        for name, value in losses.items():
            out[f"{prefix}/block{i}/{name}_unscaled"] = value
            out[f"{prefix}/block{i}/{name}_scaled"] = coefficients[name] * value
    return out


@dataclass
class Evaluation:
    metrics: dict[str, float]
    tables: dict[int, dict[str, list]]  # per MoE block: expert fractions, experts-per-token histogram, co-activation
    routes: dict[int, torch.Tensor]  # per MoE block: this rank's bool (T, E) choices on the fixed eval tokens


@torch.no_grad()
def evaluate(engine, data: PreparedData | PreparedPairs, cell: Cell, w: Worker) -> Evaluation:
    t = cell.training
    engine.eval()
    gen = torch.Generator().manual_seed(EVAL_SEED + w.rank)
    loss_sum, sums, difficulty, routes = torch.zeros(2), {}, None, {}  # routes: block -> per-batch masks
    unscaled: dict[int, dict[str, float]] = {}
    for _ in range(t.eval_batches):
        batch = data.sample("validation", t.micro_batch_size, gen, t.seq_len, t.target_len).to(engine.device)
        out: LMOutput = engine(*batch.inputs)
        loss_sum += torch.tensor([out.lm_loss.item() * batch.num_targets, batch.num_targets])
        target_blocks = [i for i in out.moe if out.target_blocks is None or i in out.target_blocks]
        if target_blocks:  # experts per token, averaged over the MoE layers the loss's tokens pass, against its loss
            experts_T = torch.stack([out.moe[i].expert_mask_TE.sum(-1) for i in target_blocks]).float().mean(0)
            difficulty = add_sums(difficulty, difficulty_sums(experts_T, out.token_nll_BS.flatten()))
        for i, aux in out.moe.items():
            sums[i] = add_sums(sums.get(i), aux.sums)
            routes.setdefault(i, []).append(aux.expert_mask_TE.cpu())  # kept to the end, and checkpointed
            for name, value in aux.unscaled.items():  # rank 0's mean over batches; the load metrics are global
                layer = unscaled.setdefault(i, {})
                layer[name] = layer.get(name, 0.0) + value.item() / t.eval_batches
    engine.train()
    total = all_reduce_sum(loss_sum)
    loss = float(total[0] / total[1])
    metrics, tables = layer_metrics("eval/moe", sums)
    metrics.update(aux_loss_metrics("eval/moe", unscaled, cell.router.balancing))
    metrics.update({"eval/loss": loss, "eval/perplexity": math.exp(min(loss, 50.0))})
    if difficulty is not None:  # Pearson r; NaN (not logged) for fixed-k routers
        metrics["eval/moe/difficulty_corr"] = pearson({k: all_reduce_sum(v) for k, v in difficulty.items()})
    return Evaluation(metrics, tables, {i: torch.cat(masks) for i, masks in routes.items()})


def saturation_metrics(snapshot: dict[int, torch.Tensor], final: dict[int, torch.Tensor]) -> dict[str, float]:
    """Router saturation of an earlier evaluation against the final one, per MoE block and mean (rank 0's tokens)."""
    per_block = {i: saturation(snapshot[i], final[i]) for i in final}
    return {**{f"eval/moe/block{i}/saturation": v for i, v in per_block.items()},
            "eval/moe/saturation": sum(per_block.values()) / len(per_block)} if per_block else {}


def train_step(engine, data: PreparedData | PreparedPairs, cell: Cell, step: int, w: Worker) -> dict[str, float]:
    t = cell.training
    # Losses stay tensors until the step ends: one host read per step, not one per loss, layer and micro-batch.
    lm, aux = torch.zeros(()), torch.zeros(())
    unscaled: dict[int, dict[str, torch.Tensor]] = {}
    for micro in range(t.grad_accum_steps):
        gen = batch_generator(cell.seed, step, micro * w.world + w.rank)
        batch = data.sample("train", t.micro_batch_size, gen, t.seq_len, t.target_len).to(engine.device)
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
    metrics = {"train/loss": lm + aux, "train/lm_loss": lm, "train/aux_loss": aux, "train/lr": engine.get_lr()[0],
               **aux_loss_metrics("train/moe", unscaled_values, cell.router.balancing)}
    if t.precision == "fp16":  # dynamic loss scaling: an overflowing step is skipped and the scale halves
        metrics["train/loss_scale"] = float(engine.optimizer.loss_scale)
        metrics["train/skipped_steps"] = engine.skipped_steps
    return metrics


def final_cost_metrics(engine, data: PreparedData | PreparedPairs, cell: Cell, tokens_per_s_per_device: float,
                       latest_eval: dict[str, float], step_seconds: float) -> dict[str, float]:
    """FLOPs/token, TFLOP/s, MFU against this device's measured peak, router latency share (every rank runs the
    timed forwards: with expert parallelism they hold collectives)."""
    model = engine.module
    param = next(model.parameters())
    metrics = cost_metrics(model, cell.training.seq_len, tokens_per_s_per_device,
                           latest_eval.get("eval/moe/expert_flops_per_token", 0.0),
                           measure_peak_tflops(param.device, param.dtype), step_seconds)
    t = cell.training
    batch = data.sample("validation", t.micro_batch_size, torch.Generator().manual_seed(EVAL_SEED), t.seq_len,
                        t.target_len).to(engine.device)
    engine.eval()
    share = router_latency_share(model, lambda: engine(*batch.inputs))
    engine.train()
    return {**metrics, **({"summary/router_latency_share": share} if share is not None else {})}


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


def peak_memory_mb() -> float:
    """Peak accelerator memory where there is one, else this worker process's peak resident set size."""
    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def report_metrics(metrics: dict[str, float], step: int) -> dict[str, float]:
    """What Ray Train (and Tune, through TuneReportCallback) sees: summary metrics, '/' -> '_' because Tune reads
    '/' as nesting. Per-block metrics stay in MLflow only."""
    out = {k.replace("/", "_"): v for k, v in metrics.items() if "/block" not in k}
    return {**out, "step": step}


def save_and_report(engine, step: int, metrics: dict[str, float], checkpoint: bool, snapshots: dict) -> None:
    """All ranks report (Ray Train requires it). At checkpoints every rank saves its DeepSpeed shards (experts live
    on their EP rank) and Ray merges the rank directories into one checkpoint. The routing snapshots of earlier
    evaluations ride along, so saturation can still be computed after a resume."""
    if not checkpoint:
        ray.train.report(report_metrics(metrics, step))
        return
    with tempfile.TemporaryDirectory() as tmp:
        engine.save_checkpoint(tmp, tag=f"step{step}", client_state={"step": step, "routing_snapshots": snapshots})
        ray.train.report(report_metrics(metrics, step), checkpoint=ray.train.Checkpoint.from_directory(tmp))


def resume(engine) -> tuple[int, dict]:
    """(step, routing snapshots) of the latest checkpoint, or (0, {}) for a fresh start."""
    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return 0, {}
    with checkpoint.as_directory() as path:
        loaded, client_state = engine.load_checkpoint(path)
    if loaded is None:  # DeepSpeed only warns when `latest` is missing; a silent fresh start would lie
        raise RuntimeError(f"checkpoint at {checkpoint.path} could not be loaded by DeepSpeed")
    return int(client_state["step"]), client_state.get("routing_snapshots", {})


def block_stacks(cell: Cell, blocks: list[int]) -> dict[str, list[int]]:
    """Encoder and decoder MoE blocks get a heatmap each (block numbering of models/seq2seq.py); one otherwise."""
    encoder_layers = getattr(cell.model.resolved_options(), "encoder_layers", None)
    if encoder_layers is None:
        return {"": blocks}
    return {"encoder": [b for b in blocks if b < encoder_layers], "decoder": [b for b in blocks if b >= encoder_layers]}


def log_final_artifacts(w: Worker, cell: Cell, tables: dict[int, dict[str, list]], domains: list[str]) -> None:
    if not tables:
        return
    fractions = {i: t["expert_fraction"] for i, t in tables.items()}
    with tempfile.TemporaryDirectory() as tmp:
        for stack, blocks in block_stacks(cell, sorted(fractions)).items():
            if blocks:
                name = f"expert_usage_{stack}" if stack else "expert_usage"
                png = expert_usage_heatmap({i: fractions[i] for i in blocks},
                                           f"{cell.router.display()} — eval expert usage {stack}".rstrip(),
                                           Path(tmp) / f"{name}.png")
                w.tracker.log_artifact(w.run_id, png, "routing")
        for i, t in sorted(tables.items()):
            if "domain_expert_share" in t:  # labelled data: which experts each domain's tokens go to
                png = heatmap(t["domain_expert_share"], domains, f"{cell.router.display()} — block {i} top-1 expert "
                              "by domain", "share of the domain's tokens", Path(tmp) / f"domain_expert_block{i}.png")
                w.tracker.log_artifact(w.run_id, png, "routing")
    rows = ["block," + ",".join(f"expert{e}" for e in range(len(next(iter(fractions.values())))))]
    rows += [f"{i}," + ",".join(f"{f:.6f}" for f in fr) for i, fr in sorted(fractions.items())]
    w.tracker.log_text(w.run_id, "\n".join(rows) + "\n", "routing/expert_usage.csv")
    for i, t in sorted(tables.items()):
        matrix = "\n".join(",".join(f"{v:.4f}" for v in row) for row in t["coactivation"])
        w.tracker.log_text(w.run_id, matrix + "\n", f"routing/coactivation_block{i}.csv")
    rows = ["block," + ",".join(f"{n}_experts" for n in range(len(next(iter(tables.values()))["experts_per_token_hist"])))]
    rows += [f"{i}," + ",".join(f"{h:.6f}" for h in t["experts_per_token_hist"]) for i, t in sorted(tables.items())]
    w.tracker.log_text(w.run_id, "\n".join(rows) + "\n", "routing/experts_per_token_hist.csv")


def summarize_test_split(engine, data: PreparedPairs, cell: Cell, w: Worker) -> dict[str, float]:
    """Decode the test documents on every rank; rank 0 scores them and logs the per-document predictions."""
    began = time.perf_counter()
    predictions = generate_summaries(engine.module, data, cell.summarization, cell.training.seq_len)
    metrics = {"summary/generate_seconds": time.perf_counter() - began}
    if w.tracker:
        metrics.update(score_and_log(w.tracker, w.run_id, predictions, data, cell.summarization))
    return metrics


def train_cell(config: dict[str, Any]) -> None:
    entered = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cell = Cell.from_resolved(config["cell"])
    t = cell.training
    data = load_prepared(storage.local_copy(config["data_path"]))  # a path, or a URI fetched once per node
    w = Worker(rank, world, Tracker(config["tracking_uri"]) if rank == 0 else None, config["run_id"])
    engine = build_engine(cell, data)
    start, snapshots = resume(engine)
    # A resume replays the steps since its checkpoint, and a restart from an unregistered checkpoint replays from 0:
    # those steps are in the run's history already (same values: data order is a function of the step).
    logged_through = w.tracker.last_logged_step(w.run_id, "train/step") if w.tracker else 0
    setup_seconds = time.perf_counter() - entered  # data load + model + DeepSpeed engine + checkpoint restore
    if w.tracker:  # where it ran (multi-node studies), and from which step
        w.tracker.set_tags(w.run_id, {"moelab.node_id": ray.get_runtime_context().get_node_id(),
                                      "moelab.node_ip": ray.util.get_node_ip_address(),
                                      **({"moelab.resumed_from_step": str(start)} if start else {})})
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * world
    tables: dict = {}
    latest_eval: dict[str, float] = {}
    times = StepTimes()
    for step in range(start + 1, t.steps + 1):
        began = time.perf_counter()
        try:
            metrics = train_step(engine, data, cell, step, w)
        except NonFiniteLoss as err:
            # A NaN is deterministic: a Ray Train retry from the checkpoint would only fail again. Stop cleanly and
            # record why on the cell's run; the driver reads it back, marks the run FAILED, and the study goes on.
            if w.tracker:
                w.tracker.set_tags(w.run_id, {REASON: str(err)})
            return
        elapsed = time.perf_counter() - began
        times.add(elapsed)
        metrics["train/tokens_per_s"] = tokens_per_step / elapsed
        metrics["train/step"] = step
        last = step == t.steps
        evaluating, checkpointing = step % t.eval_interval == 0 or last, step % t.checkpoint_interval == 0 or last
        if evaluating:
            evaluation = evaluate(engine, data, cell, w)
            latest_eval, tables = evaluation.metrics, evaluation.tables
            snapshots[step] = evaluation.routes
            metrics.update(latest_eval)
        if last:  # throughput over the (resumed part of the) run, not one noisy step
            metrics["summary/tokens_per_s"] = tokens_per_step / times.steady_step_seconds
            metrics["summary/train_seconds"] = times.total
            metrics["summary/first_step_seconds"] = times.first
            metrics["summary/setup_seconds"] = setup_seconds
            metrics["summary/peak_memory_mb"] = peak_memory_mb()
            if t.precision == "fp16":  # optimizer steps lost to overflow (DeepSpeed checkpoints the count)
                metrics["summary/skipped_steps"] = engine.skipped_steps
            metrics.update(final_cost_metrics(engine, data, cell, metrics["summary/tokens_per_s"] / world,
                                              latest_eval, times.steady_step_seconds))
            if cell.summarization is not None:
                metrics.update(summarize_test_split(engine, data, cell, w))
        if last and w.tracker:  # before the last step's metrics: a logged last step means all of this is there too
            log_final_artifacts(w, cell, tables, data.domains)
            if step > logged_through:
                for earlier, routes in sorted(snapshots.items()):  # saturation curve, at the steps it describes
                    w.tracker.log_metrics(w.run_id, saturation_metrics(routes, snapshots[step]), earlier)
        if w.tracker and step > logged_through and (step % t.log_interval == 0 or step % t.eval_interval == 0 or last):
            w.tracker.log_metrics(w.run_id, metrics, step)
        if evaluating or checkpointing:  # every report carries the latest eval, for Tune's schedulers
            save_and_report(engine, step, {**latest_eval, **metrics}, checkpointing, snapshots)
