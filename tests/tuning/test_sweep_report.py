"""What the MLflow UI and the terminal show of a sweep, computed from its trials: names that say what each trial is,
the winner on the sweep run, headlines on the study run, numbers a person reads, no run left RUNNING."""
from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from tuning.report import best_table, best_trial, study_headlines, sweep_run_metrics
from tuning.runner import INTERRUPTED, close_open_runs
from tuning.sweep_config import SweepConfig
from tuning.trainable import trial_name
from workflows.report.numbers import parse_number, significant
from workflows.study.entries import RouterEntry
from workflows.tracking import EXPERIMENT_KIND, MODEL_TRAINING, SWEEP, TRIAL, Tracker

CONFIG = SweepConfig.model_validate({"name": "a", "space": {"balancing.switch_lbl": {"loguniform": [1e-4, 0.1]},
                                                           "k": {"choice": [1, 2]}}})


def row(trial, router, loss, alpha, k, status="FINISHED", model="gpt"):
    return {"trial": trial, "name": f"{trial}-name", "router": router, "model": model, "dataset": "d",
            "status": status, "eval/loss": loss, "balancing.switch_lbl": alpha, "k": k}


def test_a_trial_is_named_after_its_router_and_the_values_it_sampled():
    base = RouterEntry.model_validate({"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}})
    assert trial_name(base, {"k": 1, "balancing.switch_lbl": 0.0001327151712530881}) == "topk(k=1, switch_lbl=1.33e-4)"
    assert trial_name(base, {"balancing.switch_lbl": 0.0066055247980503174}) == "topk(k=2, switch_lbl=0.00661)"
    assert trial_name(RouterEntry.model_validate({"name": "hash"}), {"capacity_factor": None}) == \
        "hash(capacity_factor=—)"


@given(st.floats(min_value=-1e12, max_value=1e12, allow_nan=False).filter(lambda x: x == 0 or abs(x) > 1e-12))
def test_significant_keeps_three_digits_and_reads_back_close(value):
    text = significant(value)
    digits = text.lstrip("-").split("e")[0].replace(".", "").lstrip("0")
    assert len(digits) <= 3
    assert math.isclose(float(text), value, rel_tol=5e-3, abs_tol=0)


def test_params_read_back_from_mlflow_are_numbers_again():
    assert [parse_number(v) for v in ("2", "0.0066055247980503174", "None", "topk")] == [
        2, 0.0066055247980503174, "None", "topk"]


def test_the_winner_is_the_best_finished_trial_and_the_sweep_run_carries_its_values():
    rows = [row("t0", "topk(k=2)", 5.9, 0.01, 2), row("t1", "topk(k=2)", 5.5, 0.002, 1, status="FAILED"),
            row("t2", "topk(k=2)", 6.1, 0.05, 1), row("t3", "hash", 5.8, 0.003, 2)]
    best = best_trial(rows, CONFIG)
    assert best["trial"] == "t3"  # t1 is lower but failed
    assert sweep_run_metrics(best, CONFIG) == {"eval/loss": 5.8, "best/balancing.switch_lbl": 0.003, "best/k": 2.0}
    assert study_headlines(rows, CONFIG) == {"sweep-a/best_eval_loss/hash": 5.8,
                                            "sweep-a/best_eval_loss/topk_k_2_": 5.9}
    maximise = CONFIG.model_copy(update={"mode": "max"})
    assert best_trial(rows, maximise)["trial"] == "t2"
    assert best_trial([row("t1", "hash", 5.5, 0.1, 1, status="KILLED")], CONFIG) is None


def test_headlines_name_the_model_when_a_sweep_covers_several():
    rows = [row("t0", "hash", 5.9, 0.01, 2, model="gpt"), row("t1", "hash", 5.5, 0.01, 2, model="llama")]
    assert set(study_headlines(rows, CONFIG)) == {"sweep-a/best_eval_loss/hash / gpt / d",
                                                 "sweep-a/best_eval_loss/hash / llama / d"}


def test_the_best_table_prints_three_significant_digits():
    table = best_table([row("t0", "topk(k=2)", 5.970106601715088, 0.0066055247980503174, 2)], CONFIG)
    assert "| topk(k=2) | gpt | d | 5.97 | 0.00661 | 2 | t0 |" in table


def test_an_interrupted_sweep_leaves_no_run_running_and_keeps_closed_trials_as_they_were(tmp_path):
    tracker = Tracker(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = tracker.experiment("s")
    assert tracker.client.get_experiment(experiment).tags[EXPERIMENT_KIND] == MODEL_TRAINING
    study = tracker.study_run(experiment, "s", {})
    sweep = tracker.sweep_run(experiment, study, "a", {})
    trials = {t: tracker.create_child_run(experiment, sweep, t, {"moelab.role": "trial", SWEEP: "a", TRIAL: t}, {})
              for t in ("t0", "t1")}
    tracker.finish(trials["t0"])
    ended = tracker.client.get_run(trials["t0"]).info.end_time
    close_open_runs(tracker, experiment, "a", [sweep, study], "KILLED", INTERRUPTED)
    status = {name: tracker.client.get_run(run_id).info.status
              for name, run_id in {**trials, "sweep": sweep, "study": study}.items()}
    assert status == {"t0": "FINISHED", "t1": "KILLED", "sweep": "KILLED", "study": "KILLED"}
    assert tracker.client.get_run(trials["t0"]).info.end_time == ended
    assert tracker.failure_reason(trials["t1"]) == INTERRUPTED
    # The same command again reopens the study and sweep runs, with the interruption's reason cleared.
    assert tracker.study_run(experiment, "s", {}) == study and tracker.sweep_run(experiment, study, "a", {}) == sweep
    assert tracker.client.get_run(sweep).info.status == "RUNNING" and tracker.failure_reason(sweep) is None


@pytest.mark.parametrize("line, dropped", [
    ("WARNING: 8 PYTHON worker processes have been started on node: abc with address: 1.2.3.4", True),
    ("A worker died or was killed while executing a task", False)])
def test_the_raylet_worker_pool_notice_is_the_only_one_dropped(monkeypatch, line, dropped):
    from ray._private import worker as ray_worker

    from workflows.driver.ray_cluster import _drop_worker_pool_notices

    printed = []
    monkeypatch.setattr(ray_worker, "print_to_stdstream", lambda data, ignore_prefix: printed.append(data["lines"]))
    _drop_worker_pool_notices()
    _drop_worker_pool_notices()  # idempotent: a second Ray start in the same process wraps nothing twice
    ray_worker.print_to_stdstream({"lines": [line], "pid": "raylet", "is_err": False}, ignore_prefix=False)
    assert printed == ([] if dropped else [[line]])
