"""A grid sweep through real Ray Tune + Ray Train + DeepSpeed + MLflow; re-running restores instead of re-running."""
import time

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.suite import extended
from tests.processes import experiment_created, interrupt_study, moelab_process, tail
from workflows.driver.cli import main
from workflows.driver.launch import registered_checkpoints

pytestmark = pytest.mark.slow

SWEEP_STUDY = {
    "name": "sweep",
    "routers": [{"name": "topk", "k": 1, "balancing": {"switch_lbl": 0.01}}, {"name": "hash"}],
    "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 4, "micro_batch_size": 4, "seq_len": 16, "warmup_steps": 1, "log_interval": 2,
                 "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 2},
    "sweep": {"name": "k", "routers": ["topk(k=1)"], "space": {"k": {"choice": [1, 2]}}, "search": "grid"},
}


def trial_runs(client):
    exp = client.get_experiment_by_name("sweep")
    return client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'trial'")


def test_grid_sweep_logs_one_child_run_per_trial_and_restores(tmp_path, capsys, in_process_ray):
    path, workdir = tmp_path / "sweep.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(SWEEP_STUDY))
    assert main(["tune", str(path), "--workdir", str(workdir)]) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    runs = trial_runs(client)
    assert sorted(r.data.params["sweep.k"] for r in runs) == ["1", "2"]  # grid: each value once, hash not swept
    exp = client.get_experiment_by_name("sweep")
    sweep_run = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'sweep'")
    assert len(sweep_run) == 1 and sweep_run[0].info.status == "FINISHED"
    for run in runs:
        assert run.info.status == "FINISHED"
        assert run.data.tags["mlflow.parentRunId"] == sweep_run[0].info.run_id
        assert run.data.tags["router"] == "topk(k=1)" and run.data.tags["moelab.sweep"] == "k"
        assert run.data.metrics["eval/moe/experts_per_token"] == pytest.approx(float(run.data.params["sweep.k"]))
    artifacts = {a.path for d in ("tables", "plots") for a in client.list_artifacts(sweep_run[0].info.run_id, d)}
    assert {"tables/trials.md", "tables/best_per_router.md", "plots/metric_vs_params.png"} <= artifacts
    study_run = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'study'")
    assert [r.info.status for r in study_run] == ["FINISHED"]  # a finished sweep closes its study run
    assert exp.tags["mlflow.experimentKind"] == "custom_model_development"  # the UI's training view, not GenAI's
    # The sweep run answers "which trial won": its metric, the values it sampled, and which trial it was.
    (best,) = [r for r in runs if r.data.metrics["eval/loss"] == min(t.data.metrics["eval/loss"] for t in runs)]
    assert sweep_run[0].data.metrics["eval/loss"] == best.data.metrics["eval/loss"]
    assert sweep_run[0].data.metrics["best/k"] == float(best.data.params["sweep.k"])
    assert sweep_run[0].data.tags["moelab.best_trial"] == best.data.tags["moelab.trial_id"]
    assert study_run[0].data.metrics["sweep-k/best_eval_loss/topk_k_1_"] == best.data.metrics["eval/loss"]
    for run in runs:
        k = run.data.params["sweep.k"]
        assert run.info.run_name == f"topk(k={k})"  # the trial's values, not the base cell's label
        # The sweep's metric is each trial's first metric (MLflow's compare view charts that one by default),
        # logged at step 0 by an evaluation of the untrained model, and once per evaluation after it.
        assert next(iter(run.data.metrics)) == "eval/loss"
        assert [m.step for m in client.get_metric_history(run.info.run_id, "eval/loss")] == [0, 2, 4]
    out, err = capsys.readouterr()
    assert "best eval/loss (min) per router" in out and "| topk(k=1) |" in out
    for notice in ("Configuration for experiment", "View detailed results", "tensorboard",
                   "PYTHON worker processes have been started"):
        assert notice not in out + err
    for run in runs:  # the live trial lines: each trial's start under its name, and its end
        trial = run.data.tags["moelab.trial_id"]
        assert f"trial {trial}  {run.info.run_name}  started" in out
        assert f"trial {trial}  {run.info.run_name}  finished at step 4/4" in out

    # The same command again restores the finished sweep: no new trials, no new runs.
    assert main(["tune", str(path), "--workdir", str(workdir)]) == 0
    assert "(restored)" in capsys.readouterr().out
    again = trial_runs(client)
    assert {r.info.run_id: r.data.tags["moelab.trial_id"] for r in again} == {
        r.info.run_id: r.data.tags["moelab.trial_id"] for r in runs}

    assert main(["aggregate", str(path), "--workdir", str(workdir)]) == 0
    assert "### Sweep k: best eval/loss" in capsys.readouterr().out

    # A sweep whose trial fails exits 1, and closes what it opened as FAILED: the trial, its sweep and the study.
    failing = {**SWEEP_STUDY, "fault_injection": {"nan_at_step": 2, "routers": ["topk(k=1)"]},
               "sweep": {**SWEEP_STUDY["sweep"], "name": "nan", "space": {"k": {"choice": [1]}}}}
    path.write_text(yaml.safe_dump(failing))
    assert main(["tune", str(path), "--workdir", str(workdir)]) == 1
    assert "non-finite loss at step 2" in capsys.readouterr().err
    (nan_trial,) = client.search_runs([exp.experiment_id], "tags.`moelab.sweep` = 'nan' and tags.`moelab.role` = 'trial'")
    (nan_sweep,) = client.search_runs([exp.experiment_id], "tags.`moelab.sweep` = 'nan' and tags.`moelab.role` = 'sweep'")
    assert (nan_trial.info.status, nan_sweep.info.status) == ("FAILED", "FAILED")
    assert client.get_run(study_run[0].info.run_id).info.status == "FAILED"
    assert not client.search_runs([exp.experiment_id], "attributes.status = 'RUNNING'")


ASHA_STUDY = {
    "name": "asha",
    "routers": [{"name": "topk", "k": 1, "balancing": {"switch_lbl": 0.01}}],
    "models": [{"name": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "num_experts": 4, "expert_hidden": 128}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 40, "micro_batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_interval": 5,
                 "eval_interval": 10, "eval_batches": 1, "checkpoint_interval": 10},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 1},
    "sweep": {"name": "asha", "space": {"balancing.switch_lbl": {"loguniform": [1e-4, 1.0]}, "k": {"choice": [1, 2]}},
              "search": "random", "num_samples": 4, "scheduler": "asha"},
}


def trial_state(client, experiment_id):
    """trial id -> (run id, status, end time, early_stopped tag, logged train/loss steps)."""
    runs = client.search_runs([experiment_id], "tags.`moelab.role` = 'trial'")
    return {r.data.tags["moelab.trial_id"]: (r.info.run_id, r.info.status, r.info.end_time,
                                             r.data.tags.get("moelab.early_stopped"),
                                             [m.step for m in client.get_metric_history(r.info.run_id, "train/loss")])
            for r in runs}


def checkpoint_registered(workdir, trial_id: str) -> bool:
    """Ray Train has recorded a checkpoint of the trial's run, so a kill from here on resumes from it. Before that a
    restored trial restarts from step 0 (correct, and what test_resume covers), which on a loaded machine can still
    be the case a few steps past the checkpoint."""
    return any(registered_checkpoints(str(run_dir)) for run_dir in workdir.rglob(f"train-trial_id={trial_id}"))


@extended("tests/tuning/test_sweep.py::test_grid_sweep_logs_one_child_run_per_trial_and_restores",
          "tests/tuning/test_trial_restore.py::test_a_trial_asha_stopped_before_the_kill_reports_its_recorded_metric",
          "tests/tuning/test_sweep_report.py::test_an_interrupted_sweep_leaves_no_run_running_and_keeps_closed_trials_as_they_were")
def test_asha_sweep_interrupted_mid_trial_closes_its_runs_and_restores_with_decisions_kept(tmp_path):
    path, workdir = tmp_path / "asha.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(ASHA_STUDY))
    log = tmp_path / "interrupted.log"
    proc = moelab_process("tune", path, workdir, log)
    client = None  # opened once the sweep created its database: opening one creates it (racing the sweep's setup)
    # Kill once a trial has been closed (finished or stopped by ASHA) and a later one is past its first checkpoint.
    for _poll in range(3000):  # bounded wait, a hang guard
        if client is None and experiment_created(workdir / "mlflow.db", "asha"):
            client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        exp = client.get_experiment_by_name("asha") if client else None
        state = trial_state(client, exp.experiment_id) if exp else {}
        closed = {t: s for t, s in state.items() if s[1] != "RUNNING"}
        running = [s for t, s in state.items()
                   if s[1] == "RUNNING" and s[4] and max(s[4]) >= 15 and checkpoint_registered(workdir, t)]
        if closed and running:
            break
        assert proc.poll() is None, "sweep ended before the kill point"
        time.sleep(0.2)
    assert interrupt_study(proc) == 130, tail(log)
    interrupted_run = running[0][0]
    # Ctrl-C leaves nothing RUNNING in the UI: the open trials, the sweep run and the study run are KILLED.
    statuses = {r.data.tags["moelab.role"]: r.info.status for r in client.search_runs([exp.experiment_id])
                if r.data.tags["moelab.role"] != "trial"}
    assert statuses == {"sweep": "KILLED", "study": "KILLED"}, statuses
    interrupted = trial_state(client, exp.experiment_id)
    assert interrupted[next(t for t, s in interrupted.items() if s[0] == interrupted_run)][1] == "KILLED"
    assert "RUNNING" not in {s[1] for s in interrupted.values()}

    log = tmp_path / "rerun.log"
    assert moelab_process("tune", path, workdir, log).wait(timeout=900) == 0, tail(log)
    after = trial_state(client, exp.experiment_id)
    assert len(after) == 4 and len({s[0] for s in after.values()}) == 4  # what the sweep asked for, no duplicates
    assert [r.info.status for r in client.search_runs([exp.experiment_id], "tags.`moelab.role` != 'trial'")] == [
        "FINISHED", "FINISHED"]  # one sweep run and one study run, reopened and closed
    assert all(s[1] == "FINISHED" for s in after.values())
    for trial, before in closed.items():  # closed before the kill: untouched, ASHA's stop decisions kept
        assert after[trial] == before
    (resumed,) = [s for s in after.values() if s[0] == interrupted_run]
    assert resumed[4].count(5) == 1  # its curve went on from the checkpoint, never restarted at step 0
    assert int(client.get_run(interrupted_run).data.tags["moelab.resumed_from_step"]) >= 10
    early = [s for s in after.values() if s[3] == "true"]
    assert early and all(max(s[4]) < 40 for s in early)  # ASHA cut some trials short ...
    assert any(max(s[4]) == 40 and s[3] is None for s in after.values())  # ... and let the best one finish
