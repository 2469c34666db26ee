"""The per-worker training function of one cell: runs inside every Ray Train worker.

Flow: build the model and its DeepSpeed engine -> resume from the latest Ray Train checkpoint if there is one ->
train with periodic evaluation -> every `checkpoint_interval` all ranks save DeepSpeed shards and report them to
Ray Train. Rank 0 writes metrics and artifacts to the cell's MLflow run (created by the driver, id in the config).
Sweeps (tuning/) reuse this same function.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any

import ray
import ray.train
import torch

from moe_data.prepare import PreparedData, load_prepared
from moe_models.lora import parameter_counts
from moe_data.prepared_pairs import PreparedPairs
from workflows import storage
from workflows.cell.artifacts import log_final_artifacts
from workflows.cell.engine import build_engine, resume, save_and_report
from workflows.cell.evaluation import evaluate, final_cost_metrics, peak_memory_mb, saturation_metrics
from workflows.cell.handoff import fetch_source_checkpoint, log_final_checkpoint
from workflows.cell.loop import NonFiniteLoss, StepTimes, train_step
from workflows.cell.worker import Worker
from workflows.study.cells import Cell
from workflows.tracking import REASON, SEQUENCE_LOSSES, Tracker


def summarize_test_split(engine, data: PreparedPairs, cell: Cell, w: Worker) -> dict[str, float]:
    """Decode the test documents on every rank; rank 0 scores them and logs the per-document predictions."""
    from workflows.cell.summarize import generate_summaries, score_and_log  # scoring's imports: summarization only

    began = time.perf_counter()
    predictions = generate_summaries(engine.module, data, cell.summarization, cell.training.seq_len)
    metrics = {"summary/generate_seconds": time.perf_counter() - began}
    if w.tracker:
        metrics.update(score_and_log(w.tracker, w.run_id, predictions, data, cell.summarization))
    return metrics


def log_initial_evaluation(engine, data: PreparedData | PreparedPairs, cell: Cell, w: Worker, first: str) -> None:
    """The untrained model's evaluation at step 0, with `first` (a sweep's metric) as the run's first metric: MLflow's
    compare view charts the first metric its runs logged, and a sweep's trials are compared on its metric. Every
    rank evaluates (the evaluation is collective); rank 0 logs, unless an earlier attempt of this run already did."""
    metrics = evaluate(engine, data, cell, w).metrics
    if w.tracker and not w.tracker.metric_history(w.run_id, first) and first in metrics:
        w.tracker.log_metrics(w.run_id, {first: metrics.pop(first), **metrics}, 0)


def train_cell(config: dict[str, Any]) -> None:
    entered = time.perf_counter()
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    cell = Cell.from_resolved(config["cell"])
    data = load_prepared(storage.local_copy(config["data_path"]))  # a path, or a URI fetched once per node
    w = Worker(rank, world, Tracker(config["tracking_uri"]) if rank == 0 else None, config["run_id"])
    with tempfile.TemporaryDirectory() as source_dir:  # the source cell's checkpoint, when this cell has one
        engine = build_engine(cell, data, fetch_source_checkpoint(config, Path(source_dir)))
    start, snapshots = resume(engine)
    # A resume replays the steps since its checkpoint, and a restart from an unregistered checkpoint replays from 0:
    # those steps are in the run's history already (same values: data order is a function of the step).
    logged_through = w.tracker.last_logged_step(w.run_id, "train/step") if w.tracker else 0
    setup_seconds = time.perf_counter() - entered  # data load + model + DeepSpeed engine + checkpoint restore
    if w.tracker:  # where it ran (multi-node studies), and from which step
        w.tracker.set_tags(w.run_id, {"moelab.node_id": ray.get_runtime_context().get_node_id(),
                                      "moelab.node_ip": ray.util.get_node_ip_address(),
                                      **({"moelab.resumed_from_step": str(start)} if start else {})})
    if start == 0 and config.get("first_metric", "").startswith("eval/"):
        log_initial_evaluation(engine, data, cell, w, config["first_metric"])
    monitor = w.tracker.system_metrics(w.run_id) if w.tracker else None  # CPU, memory (GPU) beside the curves
    if monitor:
        monitor.start()
    try:
        _train(engine, data, cell, config, w, start, snapshots, logged_through, setup_seconds)
    finally:
        if monitor:
            monitor.finish()


def _train(engine, data, cell: Cell, config: dict[str, Any], w: Worker, start: int, snapshots: dict,
           logged_through: int, setup_seconds: float) -> None:
    t, world = cell.training, w.world
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * world
    tables: dict = {}
    sequence_losses: list[float] = []
    latest_eval: dict[str, float] = {}
    times = StepTimes()
    eval_seconds = 0.0
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
            eval_began = time.perf_counter()
            evaluation = evaluate(engine, data, cell, w)
            eval_seconds += time.perf_counter() - eval_began
            latest_eval, tables, sequence_losses = evaluation.metrics, evaluation.tables, evaluation.sequence_losses
            snapshots[step] = evaluation.routes
            metrics.update(latest_eval)
        if last:  # throughput over the (resumed part of the) run, not one noisy step
            metrics["summary/tokens_per_s"] = tokens_per_step / times.steady_step_seconds
            metrics["summary/train_seconds"] = times.total
            metrics["summary/first_step_seconds"] = times.first
            metrics["summary/setup_seconds"] = setup_seconds
            metrics["summary/eval_seconds"] = eval_seconds  # periodic evaluations of this (resumed part of the) run
            metrics["summary/peak_memory_mb"] = peak_memory_mb()
            metrics.update(parameter_counts(engine.module))
            if t.precision == "fp16":  # optimizer steps lost to overflow (DeepSpeed checkpoints the count)
                metrics["summary/skipped_steps"] = engine.skipped_steps
            metrics.update(final_cost_metrics(engine, data, cell, metrics["summary/tokens_per_s"] / world,
                                              latest_eval, times.steady_step_seconds))
            if cell.summarization is not None:
                metrics.update(summarize_test_split(engine, data, cell, w))
        if last and w.tracker:  # before the last step's metrics: a logged last step means all of this is there too
            log_final_artifacts(w, cell, tables, data.domains)
            if sequence_losses:  # the final evaluation's per-sequence losses: the report's bootstrap pairs them
                w.tracker.log_text(w.run_id, json.dumps(sequence_losses), SEQUENCE_LOSSES)
            if config.get("export_checkpoint"):  # another cell of the study starts from this one
                log_final_checkpoint(engine.module, cell, data.vocab_size, w)
            if step > logged_through:
                for earlier, routes in sorted(snapshots.items()):  # saturation curve, at the steps it describes
                    w.tracker.log_metrics(w.run_id, saturation_metrics(routes, snapshots[step]), earlier)
        if w.tracker and step > logged_through and (step % t.log_interval == 0 or step % t.eval_interval == 0 or last):
            w.tracker.log_metrics(w.run_id, metrics, step)
        if evaluating or checkpointing:  # every report carries the latest eval, for Tune's schedulers
            save_and_report(engine, step, {**latest_eval, **metrics}, checkpointing, snapshots)
