"""The per-worker training function of one cell: runs inside every Ray Train worker, for grid cells and sweep trials.

Flow: build the model and its DeepSpeed engine -> resume from the latest Ray Train checkpoint if there is one ->
train with periodic evaluation -> at checkpoints every rank saves DeepSpeed shards and reports them to Ray Train ->
after the last step, the summary metrics and the routing artifacts. Rank 0 writes to the cell's MLflow run (created
by the driver, named in the CellJob) through the MetricSink, which owns the logging rules.
"""
from __future__ import annotations

import json
import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil
import ray.train
import torch

from moe_data.prepare import PreparedData, load_prepared
from moe_data.prepared_pairs import PreparedPairs
from moe_models.lora import parameter_counts
from workflows import storage
from workflows.cell.artifacts import log_final_artifacts
from workflows.cell.engine import build_engine, resume
from workflows.cell.evaluation import (
    Evaluation,
    evaluate,
    final_cost_metrics,
    peak_memory_mb,
    reset_peak_memory,
    saturation_metrics,
)
from workflows.cell.handoff import exported_state, fetch_source_checkpoint, log_final_checkpoint
from workflows.cell.inference_cost import inference_metrics
from workflows.cell.job import CellJob
from workflows.cell.loop import NonFiniteLoss, StepTimes, train_step
from workflows.cell.metric_sink import MetricSink
from workflows.cell.routing_trace import TRACE_ARTIFACT
from workflows.cell.worker import Worker
from workflows.metric_names import (
    EVAL,
    SUMMARY_EVAL_SECONDS,
    SUMMARY_FINAL_SECONDS,
    SUMMARY_FIRST_STEP_SECONDS,
    SUMMARY_GENERATE_SECONDS,
    SUMMARY_CHECKPOINT_EXPERT_SHARE,
    SUMMARY_PARAMS_TOTAL,
    SUMMARY_PARAMS_TRAINABLE,
    SUMMARY_PEAK_MEMORY_MB,
    SUMMARY_SETUP_SECONDS,
    SUMMARY_SKIPPED_STEPS,
    SUMMARY_TOKENS_PER_S,
    SUMMARY_TRAIN_SECONDS,
    SUMMARY_WORKER_START_SECONDS,
    TRAIN_STEP,
    TRAIN_TOKENS_PER_S,
)
from workflows.study.cells import Cell
from workflows.tracking import SEQUENCE_LOSSES, Tracker

Data = PreparedData | PreparedPairs


@dataclass
class Progress:
    """What a run carries from step to step: the latest evaluation, the routing snapshots saturation is measured
    against, and the wall times of its steps and evaluations."""

    snapshots: dict
    setup_seconds: float
    worker_start_seconds: float = 0.0
    evaluation: Evaluation | None = None
    times: StepTimes = field(default_factory=StepTimes)
    eval_seconds: float = 0.0


def train_cell(job: CellJob) -> None:
    entered = time.perf_counter()
    # Ray Train's worker setup and this module's imports (torch, DeepSpeed, MLflow) ran before this line, in the
    # process Ray Train started for this rank of this run (its actors' processes are never reused)
    worker_start = time.time() - psutil.Process().create_time()
    reset_peak_memory()  # the process may have run other Ray tasks before this cell (a reused worker)
    ctx = ray.train.get_context()
    torch.set_num_threads(max(1, int(os.environ.get("OMP_NUM_THREADS", "1"))))
    rank = ctx.get_world_rank()
    w = Worker(rank, ctx.get_world_size(), Tracker(job.tracking_uri) if rank == 0 else None, job.run_id)
    data = load_prepared(storage.local_copy(job.data_path))  # a path, or a URI fetched once per node
    with tempfile.TemporaryDirectory() as source_dir:  # the source cell's checkpoint, when this cell has one
        engine = build_engine(job.cell, data, fetch_source_checkpoint(job.tracking_uri, job.source_run_id,
                                                                      Path(source_dir)))
    start, snapshots = resume(engine)
    sink = MetricSink(w, job.cell.training)
    progress = Progress(snapshots, setup_seconds=time.perf_counter() - entered,  # data + engine + restore
                        worker_start_seconds=worker_start)
    sink.tag_placement(start)
    if start == 0 and (job.first_metric or "").startswith(f"{EVAL}/"):
        # The untrained model's evaluation, with the sweep's metric as the run's first (see CellJob.first_metric).
        # Every rank evaluates (the evaluation is collective); the sink logs once.
        sink.log_first(job.first_metric, evaluate(engine, data, job.cell, w).metrics)
    monitor = w.tracker.system_metrics(w.run_id) if w.tracker else None  # CPU, memory (GPU) beside the curves
    if monitor:
        monitor.start()
    try:
        train(engine, data, job, w, sink, start, progress)
    finally:
        if monitor:
            monitor.finish()


def train(engine, data: Data, job: CellJob, w: Worker, sink: MetricSink, start: int, progress: Progress) -> None:
    """Steps start+1 .. steps: train, evaluate when due, finish after the last, log, report at checkpoints."""
    t = job.cell.training
    tokens_per_step = t.micro_batch_size * t.grad_accum_steps * t.seq_len * w.world
    for step in range(start + 1, t.steps + 1):
        began = time.perf_counter()
        try:
            metrics = train_step(engine, data, job.cell, step, w)
        except NonFiniteLoss as err:
            # A NaN is deterministic: a Ray Train retry from the checkpoint would only fail again. Stop cleanly; the
            # study goes on.
            sink.fail(str(err))
            return
        elapsed = time.perf_counter() - began
        progress.times.add(elapsed)
        metrics.update({TRAIN_TOKENS_PER_S: tokens_per_step / elapsed, TRAIN_STEP: step})
        last = step == t.steps
        evaluating, checkpointing = step % t.eval_interval == 0 or last, step % t.checkpoint_interval == 0 or last
        if evaluating:
            metrics.update(evaluate_now(engine, data, job.cell, w, sink, step, progress,
                                        trace_tokens=t.routing_trace_tokens if last else 0))
        if last:
            final_began = time.perf_counter()
            metrics.update(summary_metrics(engine, data, job.cell, w, tokens_per_step, progress))
            finish(engine, data, job, sink, step, progress)  # before the last step's metrics (see finish)
            metrics[SUMMARY_FINAL_SECONDS] = time.perf_counter() - final_began
        sink.log_step(step, metrics, evaluating)
        if evaluating or checkpointing:
            sink.report(engine, step, metrics, checkpointing, progress.snapshots)


def evaluate_now(engine, data: Data, cell: Cell, w: Worker, sink: MetricSink, step: int,
                 progress: Progress, trace_tokens: int = 0) -> dict[str, float]:
    began = time.perf_counter()
    progress.evaluation = evaluate(engine, data, cell, w, trace_tokens)
    progress.eval_seconds += time.perf_counter() - began
    progress.snapshots[step] = progress.evaluation.routes
    sink.latest_eval = progress.evaluation.metrics
    return progress.evaluation.metrics


def summary_metrics(engine, data: Data, cell: Cell, w: Worker, tokens_per_step: int,
                    progress: Progress) -> dict[str, float]:
    """The last step's: throughput over the (resumed part of the) run rather than one noisy step, where the time went,
    memory, parameters, cost; a summarization cell's scores on its test documents."""
    times = progress.times
    tokens_per_s = tokens_per_step / times.steady_step_seconds
    metrics = {SUMMARY_TOKENS_PER_S: tokens_per_s, SUMMARY_TRAIN_SECONDS: times.total,
               SUMMARY_FIRST_STEP_SECONDS: times.first, SUMMARY_SETUP_SECONDS: progress.setup_seconds,
               SUMMARY_EVAL_SECONDS: progress.eval_seconds,  # periodic evaluations of this (resumed part of the) run
               SUMMARY_WORKER_START_SECONDS: progress.worker_start_seconds,
               SUMMARY_PEAK_MEMORY_MB: peak_memory_mb()}
    counts = parameter_counts(engine.module)
    metrics.update({SUMMARY_PARAMS_TOTAL: float(counts.total), SUMMARY_PARAMS_TRAINABLE: float(counts.trainable)})
    expert_share = getattr(engine.module, "checkpoint_expert_share", None)  # a swapped MoE checkpoint's
    if expert_share is not None:
        metrics[SUMMARY_CHECKPOINT_EXPERT_SHARE] = expert_share
    if cell.training.precision == "fp16":  # optimizer steps lost to overflow (DeepSpeed checkpoints the count)
        metrics[SUMMARY_SKIPPED_STEPS] = engine.skipped_steps
    metrics.update(final_cost_metrics(engine, data, cell, tokens_per_s / w.world, progress.evaluation.metrics,
                                      times.steady_step_seconds))
    metrics.update(inference_metrics(engine, data, cell))  # after the training peak above: it resets the counter
    if cell.summarization is not None:
        metrics.update(summarize_test_split(engine, data, cell, w))
    return metrics


def finish(engine, data: Data, job: CellJob, sink: MetricSink, step: int, progress: Progress) -> None:
    """After the last step, before that step's metrics are logged, rank 0 logs the final artifacts: a logged last
    step means every artifact is there too, so a run killed in between redoes all of this. Every rank enters: a
    source cell's export first gathers its expert-parallel experts, a collective."""
    exported = exported_state(engine.module) if job.export_checkpoint else None
    if not sink.writes:
        return
    evaluation = progress.evaluation
    log_final_artifacts(sink.w, job.cell, evaluation.tables, data.domains)
    if evaluation.trace is not None:
        with tempfile.TemporaryDirectory() as tmp:
            trace = evaluation.trace.write(Path(tmp) / Path(TRACE_ARTIFACT).name)
            sink.w.tracker.log_artifact(sink.w.run_id, trace, str(Path(TRACE_ARTIFACT).parent))
    if evaluation.sequence_losses:  # the final evaluation's per-sequence losses: the report's bootstrap pairs them
        sink.w.tracker.log_text(sink.w.run_id, json.dumps(evaluation.sequence_losses), SEQUENCE_LOSSES)
    if job.export_checkpoint:  # another cell of the study starts from this one
        log_final_checkpoint(engine.module, exported, job.cell, data.vocab_size, sink.w)
    if sink.is_new(step):  # the saturation curve, at the steps it describes
        final = progress.snapshots[step]
        sink.log_curve({earlier: saturation_metrics(routes, final) for earlier, routes in progress.snapshots.items()})


def summarize_test_split(engine, data: PreparedPairs, cell: Cell, w: Worker) -> dict[str, float]:
    """Decode the test documents on every rank; rank 0 scores them and logs the per-document predictions."""
    from workflows.cell.summarize import generate_summaries, score_and_log  # scoring's imports: summarization only

    began = time.perf_counter()
    predictions = generate_summaries(engine.module, data, cell.summarization, cell.training.seq_len)
    metrics = {SUMMARY_GENERATE_SECONDS: time.perf_counter() - began}
    if w.tracker:
        metrics.update(score_and_log(w.tracker, w.run_id, predictions, data, cell.summarization))
    return metrics
