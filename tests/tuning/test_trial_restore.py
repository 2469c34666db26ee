"""A restored trial that must not train again (ASHA stopped it, or its MLflow run closed, before the driver was
killed) still hands Tune a result with the sweep's metric, read from its MLflow run: through a real Tuner, whose
strict metric check would otherwise fail the whole restored sweep."""
from __future__ import annotations

import json

import pytest
from ray import tune

from tuning.trainable import SweepContext, run_trial
from workflows.study.sections import ResourcesConfig
from workflows.tracking import ROLE, SWEEP, TRIAL, Tracker

pytestmark = pytest.mark.slow


def stopped_before_the_kill(config: dict, ctx: SweepContext) -> None:
    """What the killed sweep left for this trial: its MLflow run at step 20, and ASHA's decision to stop it."""
    trial_id = tune.get_context().get_trial_id()
    tracker = Tracker(ctx.tracking_uri)
    run_id = tracker.create_child_run(ctx.experiment_id, ctx.sweep_run_id, trial_id,
                                      {ROLE: "trial", SWEEP: ctx.sweep_name, TRIAL: trial_id}, {})
    tracker.log_metrics(run_id, {"eval/loss": 4.25 + config["params"]["x"], "train/step": 20}, 20)
    with open(ctx.asha_state_path, "w") as f:
        json.dump({"stopped": [trial_id], "brackets": []}, f)
    run_trial(config, ctx)


def test_a_trial_asha_stopped_before_the_kill_reports_its_recorded_metric(tmp_path, in_process_ray):
    import sys

    import ray
    from ray import cloudpickle

    cloudpickle.register_pickle_by_value(sys.modules[__name__])  # the trainable travels with its code
    ray.init(address="local", num_cpus=1, include_dashboard=False)
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("restore")
    sweep_run = tracker.sweep_run(experiment, tracker.study_run(experiment, "restore", {}), "s", {})
    ctx = SweepContext("s", (), (), (), (), tracker.uri, experiment, sweep_run, str(tmp_path),
                       ResourcesConfig(), str(tmp_path / "asha.json"))
    tuner = tune.Tuner(tune.with_parameters(stopped_before_the_kill, ctx=ctx),
                       param_space={"base": 0, "params": {"x": tune.grid_search([0.0, 0.5])}},
                       tune_config=tune.TuneConfig(metric="eval_loss", mode="min"),
                       run_config=tune.RunConfig(storage_path=str(tmp_path / "tune"), verbose=0))
    results = tuner.fit()
    assert not results.errors
    assert sorted(r.metrics["eval_loss"] for r in results) == [4.25, 4.75]
    assert {r.metrics["step"] for r in results} == {20}
    assert results.get_best_result().metrics["eval_loss"] == 4.25
