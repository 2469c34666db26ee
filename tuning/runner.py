"""The driver of `moelab tune`: a Ray Tune sweep over the `sweep:` section, resumable by running it again.

A re-run restores the Tuner from its storage path (Tuner.can_restore / Tuner.restore): finished trials stay
finished, unfinished and errored trials resume from their latest checkpoint (their Ray Train run is named after the
trial id), and every trial reopens its MLflow run found by trial-id tag — nothing is duplicated.
"""
from __future__ import annotations

import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from ray import tune

from tuning.report import best_table, markdown, plot_metric_vs_params, trial_rows
from tuning.search import num_samples, param_space, scheduler, search_algorithm, tune_metric
from tuning.trainable import SweepContext, run_trial
from workflows.cells import Cell, expand
from workflows.provenance import git_commit
from workflows.runner import Workspace, cell_tags, init_ray, prepare_datasets
from workflows.study import Study
from workflows.tracking import TRIAL, Tracker


@dataclass
class SweepOutcome:
    sweep_run_id: str
    trials: int = 0
    failed: dict[str, str] = field(default_factory=dict)  # trial id -> reason
    restored: bool = False
    best_table: str = ""
    seconds: float = 0.0


def base_cells(study: Study) -> list[Cell]:
    """One cell per selected router x model x dataset, at the study's first seed."""
    sweep = study.sweep
    routers = {r.display() for r in study.sweep_routers()}
    return [c for c in expand(study) if c.router.display() in routers and c.seed == study.seeds[0]
            and (not sweep.models or c.model.display() in sweep.models)
            and (not sweep.datasets or c.dataset.name in sweep.datasets)]


def tune_study(study: Study, ws: Workspace, address: str | None = None,
               echo: Callable[[str], None] = print, verbose: bool = False) -> SweepOutcome:
    began = time.perf_counter()
    sweep = study.sweep
    ws.root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(ws.tracking_uri)
    experiment_id = tracker.experiment(study.name, ws.artifact_location)
    study_run = tracker.study_run(experiment_id, study.name, {"git_commit": git_commit()})
    sweep_run = tracker.sweep_run(experiment_id, study_run, sweep.name, {"git_commit": git_commit()})
    tracker.log_text(sweep_run, sweep.model_dump_json(indent=2), "sweep.json")
    prepared = prepare_datasets(study, ws.cache_dir)
    bases = base_cells(study)
    ctx = SweepContext(sweep.name, tuple(c.resolved() for c in bases), tuple(prepared[c.dataset].path for c in bases),
                       tuple(cell_tags(c, prepared[c.dataset]) for c in bases), ws.tracking_uri, experiment_id,
                       sweep_run, ws.storage_path, study.resources)
    init_ray(address, verbose)
    # A trial only waits on its TorchTrainer, so it takes no CPU (the train workers hold the cores); the head
    # node's built-in resource gives Tune a non-empty request and keeps trial drivers next to the study driver.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"CPU": 0, "node:__internal_head__": 0.001})
    path = f"{ws.storage_path}/sweep-{sweep.name}"
    outcome = SweepOutcome(sweep_run)
    if tune.Tuner.can_restore(path):
        outcome.restored = True
        tuner = tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True)
    else:
        tuner = tune.Tuner(
            trainable,
            param_space=param_space(sweep, len(bases)),
            tune_config=tune.TuneConfig(
                metric=tune_metric(sweep.metric), mode=sweep.mode, search_alg=search_algorithm(sweep),
                scheduler=scheduler(sweep, study.training), num_samples=num_samples(sweep, len(bases)),
                max_concurrent_trials=sweep.max_concurrent_trials or study.resources.max_concurrent_cells,
                trial_dirname_creator=lambda trial: trial.trial_id,  # lets results map back to MLflow runs
            ),
            run_config=tune.RunConfig(name=f"sweep-{sweep.name}", storage_path=ws.storage_path, verbose=1,
                                      failure_config=tune.FailureConfig(max_failures=study.resources.max_failures)),
        )
    echo(f"sweep {sweep.name}: {len(bases)} base cell(s), search {sweep.search}, scheduler {sweep.scheduler}"
         + (" (restored)" if outcome.restored else ""))
    results = tuner.fit()
    for result in results:
        trial_id = Path(result.path).name
        runs = tracker.runs_with_tag(experiment_id, TRIAL, trial_id)
        if not runs:  # the trial died before creating its run
            outcome.failed[trial_id] = str(result.error)
            continue
        run_id = runs[0].info.run_id
        reason = str(result.error) if result.error else tracker.failure_reason(run_id)
        step = (result.metrics or {}).get("step", 0)
        if step and step < study.training.steps and not reason:
            tracker.set_tags(run_id, {"moelab.early_stopped": "true"})
        tracker.finish(run_id, "FAILED" if reason else "FINISHED", reason)
        if reason:
            outcome.failed[trial_id] = reason
        outcome.trials += 1
    finish_sweep(tracker, experiment_id, sweep_run, study, outcome)
    outcome.seconds = time.perf_counter() - began
    return outcome


def finish_sweep(tracker: Tracker, experiment_id: str, sweep_run: str, study: Study, outcome: SweepOutcome) -> None:
    sweep = study.sweep
    rows = trial_rows(tracker.trial_runs(experiment_id, sweep.name), sweep)
    columns = ["trial", "router", "model", "dataset", "status", "early_stopped", "steps", sweep.metric, *sweep.space]
    tracker.log_text(sweep_run, markdown(rows, columns), "tables/trials.md")
    outcome.best_table = best_table(rows, sweep)
    tracker.log_text(sweep_run, outcome.best_table, "tables/best_per_router.md")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(sweep_run, plot_metric_vs_params(rows, sweep, Path(tmp) / "metric_vs_params.png"),
                             "plots")
    tracker.finish(sweep_run, "FAILED" if outcome.failed else "FINISHED")



