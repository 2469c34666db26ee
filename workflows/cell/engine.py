"""A cell's DeepSpeed engine: built from its resolved config, restored from Ray Train's latest checkpoint, and saved
and reported back at checkpoints."""
from __future__ import annotations

import math
import tempfile
from types import SimpleNamespace

import deepspeed
import ray.train
import torch
from deepspeed.moe.utils import split_params_into_different_moe_groups_for_optimizer

from moe_data.prepare import PreparedData
from moe_data.prepared_pairs import PreparedPairs
from moe_models.lora import apply_lora
from moe_models.models import MODELS
from workflows.study.cells import Cell
from workflows.study.sections import TrainingConfig


def lr_factor(step: int, t: TrainingConfig) -> float:
    """Linear warmup, then cosine/linear decay to min_lr_ratio (or constant)."""
    if step < t.warmup_steps:
        return (step + 1) / t.warmup_steps
    if t.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - t.warmup_steps) / max(1, t.steps - t.warmup_steps))
    decay = 0.5 * (1 + math.cos(math.pi * progress)) if t.schedule == "cosine" else 1 - progress
    return t.min_lr_ratio + (1 - t.min_lr_ratio) * decay


def skip_shared_memory_allreduce_op() -> None:
    """DeepSpeed's CPU backend compiles a C++ shared-memory all-reduce (~40 s, once per install, with a compiler at
    run time) when its process group starts. Only DeepSpeed inference's `inference_all_reduce` calls it; training's
    collectives go through torch.distributed (gloo), so the first cell of a fresh install need not wait for it."""
    compatible = deepspeed.ops.__compatible_ops__  # probed once per process; DeepSpeed keeps edits to it
    compatible["deepspeed_shm_comm"] = False


PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def build_engine(cell: Cell, data: PreparedData | PreparedPairs,
                 pretrained_path: str | None = None) -> deepspeed.DeepSpeedEngine:
    """pretrained_path: where the source cell's checkpoint was fetched to (its `pretrained: cell:...` stands in)."""
    skip_shared_memory_allreduce_op()
    torch.manual_seed(cell.seed)  # identical init on every rank
    family = MODELS.get(cell.model.name)
    t = cell.training
    options = cell.model.resolved_options()
    if pretrained_path:
        options = options.model_copy(update={"pretrained": pretrained_path})
    # A checkpoint loads at the training precision: a bf16 cell never holds an fp32 copy of a pretrained model.
    load = {"dtype": PRECISION_DTYPES[t.precision]} if cell.model.name == "hf" else {}
    model = family.build(options, cell.router.routing_spec(), data.vocab_size,
                         max(t.seq_len, t.target_len), cell.seed, num_domains=len(data.domains),
                         token_counts_V=data.train_token_counts(), **load)
    if t.lora and cell.model.name == "hf":  # from-scratch models (a cell: source among them) train in full
        apply_lora(model, t.lora)
    # Frozen parameters (LoRA) stay out of the optimizer: AdamW state only for what trains.
    groups = split_params_into_different_moe_groups_for_optimizer(
        {"params": [p for p in model.parameters() if p.requires_grad], "name": "parameters"})
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
