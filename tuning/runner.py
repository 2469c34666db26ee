"""The driver of `moelab tune`: a Ray Tune sweep over the `sweep:` section, resumable by running it again.

A re-run restores the Tuner from its storage path (Tuner.can_restore / Tuner.restore): finished trials stay
finished, unfinished and errored trials resume from their latest checkpoint (their Ray Train run is named after the
trial id), and every trial reopens its MLflow run found by trial-id tag — nothing is duplicated.
"""
from __future__ import annotations

import os
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from mlflow.entities import Run
from ray import tune

from tuning.progress import TrialWatcher
from tuning.report import (
    best_table,
    best_trial,
    markdown,
    plot_metric_vs_params,
    study_headlines,
    sweep_run_metrics,
    trial_rows,
)
from tuning.search import num_samples, param_space, scheduler, search_algorithm, tune_metric
from tuning.trainable import SweepContext, run_trial
from workflows import storage
from workflows.driver.data import prepare_datasets
from workflows.driver.progress import Progress
from workflows.driver.ray_cluster import connect_if_remote, init_ray
from workflows.driver.runner import cell_tags
from workflows.driver.workspace import Workspace
from workflows.metric_names import TRAIN_STEP
from workflows.provenance import git_commit
from workflows.study.cells import Cell, expand
from workflows.study.schema import Study
from workflows.tracking import REASON, TRIAL, Tracker


class TrialRunCloser(tune.Callback):
    """Closes a trial's MLflow run the moment Tune is done with it, so the MLflow UI shows live sweep state and a
    restored sweep finds finished trials already closed (their end times never move)."""

    def __init__(self, tracking_uri: str, experiment_id: str, steps: int):
        self.tracking_uri, self.experiment_id, self.steps = tracking_uri, experiment_id, steps
        self._tracker: Tracker | None = None

    @property
    def tracker(self) -> Tracker:
        if self._tracker is None:
            self._tracker = Tracker(self.tracking_uri)
        return self._tracker

    def __getstate__(self) -> dict:  # pickled into tuner.pkl (Tuner.restore brings it back): no live client
        return {**self.__dict__, "_tracker": None}

    def close(self, run: Run, last_result: dict, error: BaseException | str | None) -> str | None:
        """Marks the run FINISHED (tagged early_stopped when ASHA cut it short) or FAILED; returns the reason."""
        run = self.tracker.client.get_run(run.info.run_id)  # fresh status
        reason = run.data.tags.get(REASON) or (str(error) if error else None)  # the cell's own words first
        if run.info.status != "RUNNING":
            return reason
        # A trial whose function returned at once after a restore has no result; its logged step still tells.
        step = max(last_result.get("step", 0), int(run.data.metrics.get(TRAIN_STEP, 0)))
        if step and step < self.steps and not reason:
            self.tracker.set_tags(run.info.run_id, {"moelab.early_stopped": "true"})
        self.tracker.finish(run.info.run_id, "FAILED" if reason else "FINISHED", reason)
        return reason

    def _close_trial(self, trial, error) -> None:
        runs = self.tracker.runs_with_tag(self.experiment_id, TRIAL, trial.trial_id)
        if runs:
            self.close(runs[0], trial.last_result or {}, error)

    def on_trial_complete(self, iteration, trials, trial, **info) -> None:
        self._close_trial(trial, None)

    def on_trial_error(self, iteration, trials, trial, **info) -> None:
        self._close_trial(trial, trial.error_msg or "trial errored")


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
               echo: Callable[[str], None] = print, verbose: bool = False,
               progress: Progress | None = None) -> SweepOutcome:
    """progress: how running trials are shown (default: plain lines through `echo`, every 10 s per trial)."""
    with progress or Progress(echo) as shown:
        return _tune_study(study, ws, address, shown, verbose)


def _tune_study(study: Study, ws: Workspace, address: str | None, progress: Progress, verbose: bool) -> SweepOutcome:
    echo = progress.log
    began = time.perf_counter()
    sweep = study.sweep
    connect_if_remote(ws, address, verbose)
    ws.root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(ws.tracking_uri)
    experiment_id = tracker.experiment(study.name, ws.artifact_location)
    study_run = tracker.study_run(experiment_id, study.name, {"git_commit": git_commit()})
    sweep_run = tracker.sweep_run(experiment_id, study_run, sweep.name, {"git_commit": git_commit()})
    tracker.log_text(sweep_run, sweep.model_dump_json(indent=2), "sweep.json")
    outcome = SweepOutcome(sweep_run)
    try:
        _sweep(study, ws, address, verbose, tracker, experiment_id, study_run, sweep_run, outcome, progress)
    except BaseException as err:
        # Ctrl-C, or a failure of Tune or of the driver: nothing this sweep opened stays RUNNING in the UI. Trials
        # keep their checkpoints and Tune its experiment state; the same command restores, reopens and closes them.
        interrupted = isinstance(err, KeyboardInterrupt)
        close_open_runs(tracker, experiment_id, sweep.name, [sweep_run, study_run],
                        "KILLED" if interrupted else "FAILED",
                        INTERRUPTED if interrupted else f"sweep failed: {type(err).__name__}: {err}")
        if interrupted:
            echo(f"interrupted: open trials were marked KILLED; {INTERRUPTED}")
        raise
    outcome.seconds = time.perf_counter() - began
    return outcome


def _sweep(study: Study, ws: Workspace, address: str | None, verbose: bool, tracker: Tracker, experiment_id: str,
           study_run: str, sweep_run: str, outcome: SweepOutcome, progress: Progress) -> None:
    sweep, echo = study.sweep, progress.log
    prepared = prepare_datasets(study, ws)
    bases = base_cells(study)
    asha_state = storage.join(ws.storage_path, f"sweep-{sweep.name}.asha.json")  # beside Tune's experiment dir
    ctx = SweepContext(sweep.name, tuple(c.resolved() for c in bases), tuple(c.router for c in bases),
                       tuple(prepared[c.dataset].path for c in bases),
                       tuple(cell_tags(c, prepared[c.dataset]) for c in bases), ws.tracking_uri, experiment_id,
                       sweep_run, ws.storage_path, study.resources, asha_state, sweep.metric)
    init_ray(address, verbose)
    quiet_tune(verbose)
    # Tune snapshots the experiment (trial states, ASHA's rungs) at most this often; the default (>= 10 s) would let
    # a killed driver forget up to 10 s of scheduling decisions. A snapshot of a few trials costs milliseconds.
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "1")
    # A trial only waits on its TorchTrainer, so it takes no CPU (the train workers hold the cores); the head
    # node's built-in resource gives Tune a non-empty request and keeps trial drivers next to the study driver.
    trainable = tune.with_resources(tune.with_parameters(run_trial, ctx=ctx),
                                    {"CPU": 0, "node:__internal_head__": 0.001})
    closer = TrialRunCloser(ws.tracking_uri, experiment_id, study.training.steps)
    tuner, outcome.restored = _tuner(study, ws, trainable, closer, len(bases), asha_state, verbose)
    echo(f"sweep {sweep.name}: {len(bases)} base cell(s), search {sweep.search}, scheduler {sweep.scheduler}"
         + (" (restored)" if outcome.restored else ""))
    with TrialWatcher(tracker, experiment_id, sweep.name, study.training.steps, asha_state, progress):
        results = tuner.fit()
    for result in results:
        trial_id = Path(result.path).name
        runs = tracker.runs_with_tag(experiment_id, TRIAL, trial_id)
        if not runs:  # the trial died before creating its run
            outcome.failed[trial_id] = str(result.error)
            continue
        reason = closer.close(runs[0], result.metrics or {}, result.error)
        if reason:
            outcome.failed[trial_id] = reason
        outcome.trials += 1
    finish_sweep(tracker, experiment_id, sweep_run, study_run, study, outcome)



def _tuner(study: Study, ws: Workspace, trainable, closer: TrialRunCloser, bases: int, asha_state: str,
           verbose: bool) -> tuple[tune.Tuner, bool]:
    """The sweep's Tuner, restored from its storage path when an earlier run left one; and whether it was."""
    sweep = study.sweep
    path = storage.join(ws.storage_path, f"sweep-{sweep.name}")
    if tune.Tuner.can_restore(path):
        return tune.Tuner.restore(path, trainable=trainable, resume_unfinished=True, resume_errored=True), True
    return tune.Tuner(
        trainable,
        param_space=param_space(sweep, bases),
        tune_config=tune.TuneConfig(
            metric=tune_metric(sweep.metric), mode=sweep.mode,
            search_alg=search_algorithm(sweep, sweep.max_concurrent_trials or study.resources.max_concurrent_cells),
            scheduler=scheduler(sweep, study.training, asha_state), num_samples=num_samples(sweep, bases),
            trial_dirname_creator=lambda trial: trial.trial_id,  # lets results map back to MLflow runs
        ),
        run_config=tune.RunConfig(name=f"sweep-{sweep.name}", storage_path=ws.storage_path,
                                  verbose=1 if verbose else 0,  # our own trial lines instead of Tune's table
                                  callbacks=[closer],
                                  failure_config=tune.FailureConfig(max_failures=study.resources.max_failures)),
    ), False

INTERRUPTED = "interrupted; run the same command again to resume"


def close_open_runs(tracker: Tracker, experiment_id: str, sweep_name: str, parents: list[str], status: str,
                    reason: str) -> None:
    """Ends the sweep's trial runs that are still RUNNING, then its sweep and study runs, with `status`."""
    for run in tracker.trial_runs(experiment_id, sweep_name):
        if run.info.status == "RUNNING":
            tracker.finish(run.info.run_id, status, reason)
    for run_id in parents:
        tracker.finish(run_id, status, reason)


def quiet_tune(verbose: bool) -> None:
    """Tune's own terminal output (its configuration box, "View detailed results here", the TensorBoard hint) says
    nothing a moelab user acts on: the trial lines and the best-trial table replace it (`--verbose` keeps it).
    Tune's SIGINT handler would turn Ctrl-C into a graceful stop whose unfinished trials come back as results that
    look finished; moelab handles Ctrl-C itself, as `moelab run` does."""
    if not verbose:
        os.environ.setdefault("RAY_AIR_NEW_OUTPUT", "0")  # the legacy reporter, which is silent at verbose=0
    os.environ["TUNE_DISABLE_SIGINT_HANDLER"] = "1"


def finish_sweep(tracker: Tracker, experiment_id: str, sweep_run: str, study_run: str, study: Study,
                 outcome: SweepOutcome) -> None:
    """The sweep's tables and plot, its winner on the sweep run and headlines on the study run; then both close."""
    sweep = study.sweep
    rows = trial_rows(tracker.trial_runs(experiment_id, sweep.name), sweep)
    if (best := best_trial(rows, sweep)) is not None:
        tracker.log_metrics(sweep_run, sweep_run_metrics(best, sweep), 0)
        tracker.set_tags(sweep_run, {"moelab.best_trial": best["trial"], "moelab.best_trial_name": best["name"]})
        tracker.log_metrics(study_run, study_headlines(rows, sweep), 0)
    columns = ["trial", "router", "model", "dataset", "status", "early_stopped", "steps", sweep.metric, *sweep.space]
    tracker.log_text(sweep_run, markdown(rows, columns), "tables/trials.md")
    outcome.best_table = best_table(rows, sweep)
    tracker.log_text(sweep_run, outcome.best_table, "tables/best_per_router.md")
    with tempfile.TemporaryDirectory() as tmp:
        tracker.log_artifact(sweep_run, plot_metric_vs_params(rows, sweep, Path(tmp) / "metric_vs_params.png"),
                             "plots")
    status = "FAILED" if outcome.failed else "FINISHED"
    tracker.finish(sweep_run, status)
    tracker.finish(study_run, status)



