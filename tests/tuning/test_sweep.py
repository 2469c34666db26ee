"""A grid sweep through real Ray Tune + Ray Train + DeepSpeed + MLflow; re-running restores instead of re-running."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from workflows.cli import main

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


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    import ray

    yield
    ray.shutdown()


def trial_runs(client):
    exp = client.get_experiment_by_name("sweep")
    return client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'trial'")


def test_grid_sweep_logs_one_child_run_per_trial_and_restores(tmp_path, capsys):
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
    out = capsys.readouterr().out
    assert "best eval/loss (min) per router" in out and "| topk(k=1) |" in out

    # The same command again restores the finished sweep: no new trials, no new runs.
    assert main(["tune", str(path), "--workdir", str(workdir)]) == 0
    assert "(restored)" in capsys.readouterr().out
    again = trial_runs(client)
    assert {r.info.run_id: r.data.tags["moelab.trial_id"] for r in again} == {
        r.info.run_id: r.data.tags["moelab.trial_id"] for r in runs}

    assert main(["aggregate", str(path), "--workdir", str(workdir)]) == 0
    assert "### Sweep k: best eval/loss" in capsys.readouterr().out
