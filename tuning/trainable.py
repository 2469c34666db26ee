"""One Tune trial = one Ray Train run of the same per-worker function the grid cells use (workflows.cell.train_cell).

With Ray 2.60's Train V2 a trial is a function trainable that launches a TorchTrainer named after the trial id and
forwards its reports to Tune through TuneReportCallback. The trial's MLflow run is found again by its trial-id tag,
so a restored sweep reopens runs instead of duplicating them.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

import ray.tune
from ray.tune.integration.ray_train import TuneReportCallback

from tuning.asha import stopped_trials
from tuning.search import tune_metric
from workflows.cell.engine import report_metrics
from workflows.cell.job import CellJob
from workflows.driver.launch import make_trainer
from workflows.metric_names import EVAL_LOSS, TRAIN_STEP
from workflows.report.numbers import readable
from workflows.study.cells import Cell
from workflows.study.entries import RouterEntry
from workflows.study.sections import ResourcesConfig
from workflows.tracking import ROLE, SWEEP, TRIAL, Tracker, flatten


@dataclass(frozen=True)
class SweepContext:
    """Constants of a sweep, passed with tune.with_parameters (kept out of the searched space)."""

    sweep_name: str
    base_cells: tuple[dict[str, Any], ...]  # resolved configs of the cells being swept
    base_routers: tuple[RouterEntry, ...]  # their router entries as the study file writes them (trial names)
    data_paths: tuple[str, ...]
    tags: tuple[dict[str, str], ...]  # per base cell: router/model/dataset/seed/provenance tags
    tracking_uri: str
    experiment_id: str
    sweep_run_id: str
    storage_path: str
    resources: ResourcesConfig
    asha_state_path: str  # where ResumableASHA records the trials it stopped
    metric: str = EVAL_LOSS  # what the sweep optimises: each trial's run logs it first (see train_cell)


def trial_name(base: RouterEntry, params: dict[str, Any]) -> str:
    """What the trial is, as its MLflow run name and terminal lines say it: the base router's written options with the
    sampled values over them, e.g. topk(k=1, switch_lbl=1.33e-4)."""
    values = {**base.options, **{path.rpartition(".")[2]: value for path, value in params.items()}}
    return f"{base.name}({', '.join(f'{key}={readable(value)}' for key, value in values.items())})"


def trial_cell(ctx: SweepContext, config: dict[str, Any]) -> Cell:
    base = Cell.from_resolved(ctx.base_cells[config["base"]])
    router = base.router.with_overrides({**config["params"], "label": base.router.display()})
    return replace(base, router=router)


def trial_run_id(tracker: Tracker, ctx: SweepContext, trial_id: str, cell: Cell,
                 config: dict[str, Any]) -> str | None:
    """The trial's MLflow run (reopened, or created); None if that run already FINISHED."""
    found = tracker.runs_with_tag(ctx.experiment_id, TRIAL, trial_id)
    if found and found[0].info.status == "FINISHED":
        return None
    if found:
        tracker.reopen(found[0].info.run_id)
        return found[0].info.run_id
    tags = {**ctx.tags[config["base"]], ROLE: "trial", SWEEP: ctx.sweep_name, TRIAL: trial_id}
    params = {**flatten(cell.resolved()), **{f"sweep.{k}": v for k, v in config["params"].items()}}
    return tracker.create_child_run(ctx.experiment_id, ctx.sweep_run_id,
                                    trial_name(ctx.base_routers[config["base"]], config["params"]),
                                    tags, params)


def report_recorded(tracker: Tracker, ctx: SweepContext, trial_id: str) -> None:
    """A trial that ends without training (or that failed) still owes Tune a result holding the sweep's metric:
    Tune's strict metric check fails the whole sweep otherwise. Its last recorded metrics, from its MLflow run; the
    metric as NaN when the run never logged it, and then without the step, so that ASHA records nothing of it."""
    found = tracker.runs_with_tag(ctx.experiment_id, TRIAL, trial_id)
    metrics = found[0].data.metrics if found else {}
    if ctx.metric in metrics:
        ray.tune.report(report_metrics(metrics, int(metrics.get(TRAIN_STEP, 0))))
    else:
        ray.tune.report({tune_metric(ctx.metric): math.nan})


def run_trial(config: dict[str, Any], ctx: SweepContext) -> None:
    trial_id = ray.tune.get_context().get_trial_id()
    tracker = Tracker(ctx.tracking_uri)
    if trial_id in stopped_trials(ctx.asha_state_path):
        # ASHA stopped it before the driver was killed; the restored sweep keeps that decision.
        report_recorded(tracker, ctx, trial_id)
        return
    cell = trial_cell(ctx, config)
    run_id = trial_run_id(tracker, ctx, trial_id, cell, config)
    if run_id is None:
        # Closed in MLflow (finished, or stopped by ASHA) after Tune's last experiment snapshot: a restored sweep
        # must not train it again. MLflow is the record of what finished.
        report_recorded(tracker, ctx, trial_id)
        return
    job = CellJob(cell, ctx.data_paths[config["base"]], ctx.tracking_uri, run_id, first_metric=ctx.metric)
    trainer = make_trainer(f"train-trial_id={trial_id}", job, ctx.resources, ctx.storage_path,
                           callbacks=[TuneReportCallback()])
    trainer.fit()
    if tracker.failure_reason(run_id):
        # The cell stopped itself (a non-finite loss), maybe before its first report: without a result holding the
        # metric, Tune's strict metric check would fail the whole sweep. TrialRunCloser marks the run FAILED.
        report_recorded(tracker, ctx, trial_id)
