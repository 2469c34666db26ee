"""The driver of `moelab run`: study -> prepared data -> MLflow runs -> Ray Train cells -> comparison table.

Resume is the same command again: finished cells (FINISHED in MLflow) are skipped, the others reopen their MLflow
run and their Ray Train run (same name and storage path) continues from its latest checkpoint.
"""
from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workflows.cell.job import CellJob, JobResult, PretrainedJob
from workflows.driver.data import PreparedDataset, check_domain_labels, prepare_datasets, summarization_texts
from workflows.driver.progress import Progress, StepRates, duration, read_progress, study_eta
from workflows.driver.ray_cluster import connect_if_remote, init_ray
from workflows.driver.workspace import Workspace
from workflows.metric_names import EVAL_LOSS, SUMMARY_CELL_WALL_SECONDS, SUMMARY_TOKENS_PER_S
from workflows.provenance import git_commit, package_versions
from workflows.report.exports import pool_with_losses, write_claims_report, write_pooled_report
from workflows.report.plots import write_plots
from workflows.report.summarization import write_summarization_report
from workflows.report.table import table_rows, write_table
from workflows.study.cells import Cell, PretrainedCell, expand, pretrained_cells
from workflows.study.entries import DatasetEntry
from workflows.study.schema import Study
from workflows.tracking import Tracker, flatten, metric_key


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> reason
    table_path: Path | None = None
    pooled_path: Path | None = None  # seeds pooled, with the baseline test and the regime check
    claims_path: Path | None = None  # each claim's computed verdict (studies with claims:)
    summarization_report: Path | None = None
    plots: list[Path] = field(default_factory=list)  # pareto, eval-loss curves, expert usage side by side
    timings: dict[str, float] = field(default_factory=dict)


def provenance_tags(data: PreparedDataset) -> dict[str, str]:
    return {"git_commit": git_commit(), "dataset_fingerprint": data.fingerprint,
            **{f"version.{k}": v for k, v in package_versions().items()}}


def cell_tags(cell: Cell, data: PreparedDataset) -> dict[str, str]:
    return {"router": cell.router.display(), "model": cell.model.display(), "dataset": cell.dataset.name,
            "seed": str(cell.seed), **provenance_tags(data)}


def run_study(study: Study, ws: Workspace, address: str | None = None,
              echo: Callable[[str], None] = print, verbose: bool = False,
              progress: Progress | None = None) -> StudyOutcome:
    """progress: how running cells are shown (default: plain lines through `echo`, every 10 s per cell)."""
    with progress or Progress(echo) as shown:
        return _run_study(study, ws, address, shown, verbose)


def _run_study(study: Study, ws: Workspace, address: str | None, progress: Progress, verbose: bool) -> StudyOutcome:
    echo = progress.log
    began = time.perf_counter()
    connect_if_remote(ws, address, verbose)
    ws.root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(ws.tracking_uri)
    # Created once from the driver before any cell starts: concurrent first writers would race on SQLite.
    experiment_id = tracker.experiment(study.name, ws.artifact_location)
    parent = tracker.study_run(experiment_id, study.name, {"git_commit": git_commit()})
    tracker.log_text(parent, study.model_dump_json(indent=2), "study.json")
    outcome = StudyOutcome(experiment_id, parent)

    prepared = prepare_datasets(study, ws)
    outcome.timings["prepare_data_s"] = time.perf_counter() - began
    cells = expand(study)
    check_domain_labels(cells, prepared)
    existing = tracker.cell_runs(experiment_id)
    todo: list[tuple[Cell, str]] = []
    run_ids = {cell_id: run.info.run_id for cell_id, run in existing.items()}  # a finished source's too
    for cell in cells:
        run_id = _open_run(tracker, existing.get(cell.id), outcome, cell.id, lambda cell=cell: _new_cell_run(
            tracker, experiment_id, parent, cell, prepared[cell.dataset]))
        if run_id:
            todo.append((cell, run_id))
            run_ids[cell.id] = run_id
    existing = tracker.cell_runs(experiment_id, role="pretrained")
    pretrained: list[tuple[PretrainedCell, str]] = []
    for cell in pretrained_cells(study):
        run_id = _open_run(tracker, existing.get(cell.id), outcome, cell.id, lambda cell=cell: tracker.create_cell_run(
            experiment_id, parent, cell.id, f"{cell.baseline.display()}-pretrained",
            {"router": cell.baseline.display(), "dataset": cell.dataset.name,
             **provenance_tags(prepared[cell.dataset])}, flatten(cell.resolved()), role="pretrained"))
        if run_id:
            pretrained.append((cell, run_id))
    echo(f"study {study.name}: {len(cells)} cells + {len(pretrained_cells(study))} pretrained baselines, "
         f"{len(outcome.skipped)} already finished, {len(todo) + len(pretrained)} to run")

    t_ray = time.perf_counter()
    if todo or pretrained:
        init_ray(address, verbose)
    outcome.timings["ray_init_s"] = time.perf_counter() - t_ray
    t_cells = time.perf_counter()
    try:
        _run_cells(todo, study, ws, prepared, tracker, outcome, progress, run_ids, {c.source_id for c in cells})
        _run_pretrained(pretrained, study, ws, prepared, tracker, outcome, echo)
    except KeyboardInterrupt:
        # Unfinished cells keep their checkpoints and MLflow runs; the same command resumes them.
        for cell, run_id in [*todo, *pretrained]:
            if cell.id not in outcome.finished and cell.id not in outcome.failed:
                tracker.finish(run_id, "KILLED", "interrupted; run the same command again to resume")
        tracker.finish(parent, "KILLED")
        echo("interrupted: unfinished cells were marked KILLED; run the same command again to resume")
        raise
    outcome.timings["cells_s"] = time.perf_counter() - t_cells

    runs = tracker.cell_runs(experiment_id)
    tracker.log_metrics(parent, headline_metrics(cells, runs), 0)
    outcome.table_path = write_table(table_rows(cells, runs), ws.root / study.name, tracker, parent)
    # One read of the cells' sequence losses, for the pooled table, the plots and the claims.
    pooled, losses = pool_with_losses(cells, runs, study.baseline, tracker, study.claims)
    outcome.pooled_path = write_pooled_report(cells, runs, study.baseline, ws.root / study.name, tracker, parent,
                                              pooled)
    if study.claims:
        outcome.claims_path = write_claims_report(study, cells, runs, pooled, losses, ws.root / study.name, tracker,
                                                  parent)
    outcome.plots = write_plots(cells, runs, pooled, ws.root / f"{study.name}_plots", tracker, parent)
    outcome.summarization_report = write_summarization_report(
        study, cells, runs, tracker, summarization_texts(prepared), ws.root, parent,
        tracker.cell_runs(experiment_id, role="pretrained"))
    tracker.finish(parent, "FAILED" if outcome.failed else "FINISHED")
    outcome.timings["total_s"] = time.perf_counter() - began
    return outcome


# How often the driver reads its running cells' latest metrics back from MLflow (one get_run per running cell).
PROGRESS_POLL_S = 1.0


def headline_metrics(cells: list[Cell], runs: dict) -> dict[str, float]:
    """The study run's own row in the MLflow UI: per router, the eval loss of its best finished cell and that
    cell's tokens/s, so the parent row says something before it is expanded."""
    best: dict[str, tuple[float, float]] = {}
    one_model = len({c.model.display() for c in cells}) == 1
    for cell in cells:
        run = runs.get(cell.id)
        if run is None or run.info.status != "FINISHED" or EVAL_LOSS not in run.data.metrics:
            continue
        loss, speed = run.data.metrics[EVAL_LOSS], run.data.metrics.get(SUMMARY_TOKENS_PER_S, float("nan"))
        label = cell.router.display() if one_model else f"{cell.router.display()} / {cell.model.display()}"
        if label not in best or loss < best[label][0]:
            best[label] = (loss, speed)
    out = {}
    for label, (loss, speed) in best.items():
        key = metric_key(label)
        out[f"best_eval_loss/{key}"], out[f"best_tokens_per_s/{key}"] = loss, speed
    return out


def _open_run(tracker: Tracker, run, outcome: StudyOutcome, cell_id: str, create: Callable[[], str]) -> str | None:
    """The MLflow run a cell (re)runs in — reopened, or created — or None when it already FINISHED."""
    if run is not None and run.info.status == "FINISHED":
        outcome.skipped.append(cell_id)
        return None
    if run is not None:
        tracker.reopen(run.info.run_id)
        return run.info.run_id
    return create()


def _new_cell_run(tracker: Tracker, experiment_id: str, parent: str, cell: Cell, data: PreparedDataset) -> str:
    run_id = tracker.create_cell_run(experiment_id, parent, cell.id, f"{cell.router.display()}-s{cell.seed}",
                                     cell_tags(cell, data), flatten(cell.resolved()))
    tracker.log_text(run_id, json.dumps(cell.resolved(), indent=2), "config/resolved_config.json")
    tracker.log_dataset(run_id, cell.dataset.name, data.fingerprint, data.path)
    return run_id


def _run_pretrained(pending: list[tuple[PretrainedCell, str]], study: Study, ws: Workspace,
                    prepared: dict[DatasetEntry, PreparedDataset], tracker: Tracker, outcome: StudyOutcome,
                    echo: Callable[[str], None]) -> None:
    """Evaluation-only cells, as Ray tasks of one worker's resources each."""
    import ray

    from workflows.cell.pretrained import evaluate_pretrained

    task = ray.remote(num_cpus=study.resources.cpus_per_worker, num_gpus=study.resources.gpus_per_worker,
                      max_retries=0)(evaluate_pretrained)
    refs = {}
    for cell, run_id in pending:
        job = PretrainedJob(cell, prepared[cell.dataset].path, ws.tracking_uri, run_id)
        refs[task.remote(job)] = (cell, run_id, time.perf_counter())
        echo(f"  started  {cell.id}  {cell.title}")
    for ref, (cell, run_id, started) in refs.items():
        result = ray.get(ref)
        tracker.finish(run_id, result.status, result.reason)
        if result.status == "FINISHED":
            outcome.finished.append(cell.id)
            echo(f"  finished {cell.id}  {cell.title}  ({time.perf_counter() - started:.1f}s)")
        else:
            outcome.failed[cell.id] = result.reason
            echo(f"  FAILED   {cell.id}  {cell.title}: {result.reason}")


def _next_startable(queue: list[tuple[Cell, str]], outcome: StudyOutcome
                    ) -> tuple[tuple[Cell, str] | None, list[tuple[Cell, str]]]:
    """(the first queued cell whose source, if it has one, has finished; the queued cells whose source failed),
    both taken off the queue."""
    done = set(outcome.finished) | set(outcome.skipped)
    orphans = [item for item in queue if item[0].source_id in outcome.failed]
    for item in orphans:
        queue.remove(item)
    for item in queue:
        if item[0].source_id is None or item[0].source_id in done:
            queue.remove(item)
            return item, orphans
    return None, orphans


def _run_cells(todo: list[tuple[Cell, str]], study: Study, ws: Workspace, prepared: dict[DatasetEntry, PreparedDataset],
               tracker: Tracker, outcome: StudyOutcome, progress: Progress, run_ids: dict[str, str],
               sources: set[str | None]) -> None:
    import ray
    from mlflow.exceptions import MlflowException

    from workflows.driver.launch import fit_cell_remote

    echo = progress.log
    queue = list(todo)
    running: dict = {}  # ray ObjectRef -> (cell, run_id, start time)
    rates, cell_seconds = StepRates(), []
    while queue or running:
        while len(running) < study.resources.max_concurrent_cells:
            item, orphans = _next_startable(queue, outcome)
            for cell, run_id in orphans:
                outcome.failed[cell.id] = f"its source cell {cell.source_id} failed"
                tracker.finish(run_id, "FAILED", outcome.failed[cell.id])
                echo(f"  FAILED   {cell.id}  {cell.title}: {outcome.failed[cell.id]}")
            if item is None:
                break
            cell, run_id = item
            job = CellJob(cell, prepared[cell.dataset].path, ws.tracking_uri, run_id, cell.id in sources,
                          run_ids.get(cell.source_id) if cell.source_id else None)
            ref = fit_cell_remote.remote(job, ws.cell_storage(study.name))
            running[ref] = (cell, run_id, time.perf_counter())
            echo(f"  started  {cell.id}  {cell.title}")
        if not running:  # nothing left can start: cells whose source is missing from this run
            for cell, run_id in queue:
                outcome.failed[cell.id] = f"its source cell {cell.source_id} did not run"
                tracker.finish(run_id, "FAILED", outcome.failed[cell.id])
            queue.clear()
            continue
        done, _ = ray.wait(list(running), num_returns=1, timeout=PROGRESS_POLL_S)
        if not done:
            try:
                rows = [read_progress(tracker, run_id, cell.title, cell.training.steps, rates)
                        for cell, run_id, _ in running.values()]
            except MlflowException:  # a busy or restarting store: progress waits for the next reading
                continue
            eta = study_eta(rows, len(queue), study.resources.max_concurrent_cells, cell_seconds)
            progress.show(f"{len(outcome.finished) + len(outcome.failed)}/{len(todo)} cells done, "
                          f"study ETA {duration(eta)}", rows)
            continue
        cell, run_id, started = running.pop(done[0])
        result = ray.get(done[0])
        if result.status == "FINISHED" and (reason := tracker.failure_reason(run_id)):
            result = JobResult("FAILED", reason, result.metrics)  # the cell stopped itself (e.g. NaN loss)
        seconds = time.perf_counter() - started
        cell_seconds.append(seconds)
        # Launch to result, as the driver saw it: minus the cell's setup, train and eval seconds, its overhead.
        tracker.log_metrics(run_id, {SUMMARY_CELL_WALL_SECONDS: seconds}, cell.training.steps)
        tracker.finish(run_id, result.status, result.reason)
        if result.status == "FINISHED":
            outcome.finished.append(cell.id)
            echo(f"  finished {cell.id}  {cell.title}  ({seconds:.1f}s, eval loss {result.metrics.get('eval_loss', float('nan')):.4f})")
        else:
            outcome.failed[cell.id] = result.reason or "unknown"
            echo(f"  FAILED   {cell.id}  {cell.title}: {result.reason}")
