"""Kill the driver (SIGKILL, whole process group: local Ray dies with it) after a checkpoint; the same command resumes."""
import contextlib
import subprocess
import time
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.processes import kill_study, moelab_process, tail
from workflows.driver.launch import RAY_TRAIN_SNAPSHOT, registered_checkpoints
from workflows.study.cells import expand
from workflows.study.loading import parse_study

pytestmark = pytest.mark.slow

STUDY = {
    "name": "resume",
    "routers": [{"name": "hash"}, {"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}],
    "models": [{"name": "gpt", "d_model": 128, "n_layers": 4, "n_heads": 4, "num_experts": 4, "expert_hidden": 256}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 100, "micro_batch_size": 16, "seq_len": 128, "warmup_steps": 2, "log_interval": 10,
                 "eval_interval": 50, "eval_batches": 2, "checkpoint_interval": 20},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 1},
}


def moelab_run(study: Path, workdir: Path) -> subprocess.Popen:
    return moelab_process("run", study, workdir, log=workdir.parent / "moelab.log")


def wait_until_logged(proc: subprocess.Popen, workdir: Path, study: str, cell_id: str, step: int) -> None:
    """Poll MLflow until the cell has logged `step`. Killing only after the cell moved past a checkpoint avoids
    the window between a checkpoint directory appearing and Ray Train registering it (a kill there restarts from
    the previous checkpoint, which is correct but not what these tests check)."""
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    for _poll in range(3000):  # bounded wait, a hang guard
        exp = client.get_experiment_by_name(study) if (workdir / "mlflow.db").exists() else None
        runs = client.search_runs([exp.experiment_id], f"tags.`moelab.cell_id` = '{cell_id}'") if exp else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")):
            return
        assert proc.poll() is None, f"study ended before the kill point:\n{tail(workdir.parent / 'moelab.log')}"
        time.sleep(0.2)
    pytest.fail(f"cell {cell_id} never reached step {step}")


def train_workers_of(proc: subprocess.Popen) -> list[psutil.Process]:
    """The Ray Train workers of this test's own study: descendants of its driver (through the local Ray it started),
    never a process of anyone else's that happens to carry the same name."""
    workers = []
    for child in psutil.Process(proc.pid).children(recursive=True):
        with contextlib.suppress(psutil.NoSuchProcess):
            if "RayTrainWorker" in " ".join(child.cmdline()):
                workers.append(child)
    return workers


def assert_one_point_per_step(client: MlflowClient, run) -> None:
    """A resumed run's history reads as one run: every metric has at most one point per step."""
    for key in run.data.metrics:
        steps = [m.step for m in client.get_metric_history(run.info.run_id, key)]
        assert len(steps) == len(set(steps)), f"{key}: steps logged twice: {sorted(steps)}"


def test_sigkill_then_rerun_resumes_without_retraining_or_duplicates(tmp_path):
    path, workdir = tmp_path / "resume.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(STUDY))
    first, second = [c.id for c in expand(parse_study(STUDY))]
    proc = moelab_run(path, workdir)
    wait_until_logged(proc, workdir, "resume", second, 30)  # past the second cell's step-20 checkpoint
    kill_study(proc)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("resume")
    before = {r.data.tags["moelab.cell_id"]: r for r in client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")}
    assert before[first].info.status == "FINISHED" and before[second].info.status == "RUNNING"

    assert moelab_run(path, workdir).wait(timeout=600) == 0
    after = {r.data.tags["moelab.cell_id"]: r for r in client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")}
    assert set(after) == {first, second} and len(client.search_runs([exp.experiment_id])) == 3  # + study run
    assert all(r.info.status == "FINISHED" for r in after.values())
    assert after[first].info.end_time == before[first].info.end_time  # finished cell not retrained
    assert after[second].info.run_id == before[second].info.run_id  # reopened, not duplicated
    resumed_from = int(after[second].data.tags["moelab.resumed_from_step"])
    assert resumed_from >= 20 and resumed_from % 20 == 0
    history = sorted(client.get_metric_history(after[second].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    steps = [m.step for m in history]
    assert steps == list(range(10, 101, 10))  # the steps replayed since the checkpoint were not logged again
    assert_one_point_per_step(client, after[second])


def test_kill_before_ray_registered_the_checkpoint_restarts_without_repeating_steps(tmp_path):
    """A kill between a checkpoint folder appearing and Ray Train registering it: Ray does not know the folder, so
    the cell restarts from step 0. Reproduced exactly by removing Ray Train's record of its checkpoints after a kill
    past the first one. The restarted cell logs no step twice, and the unregistered folder is pruned."""
    study = dict(STUDY, name="orphan", routers=[{"name": "topk", "k": 2}])
    path, workdir = tmp_path / "orphan.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(study))
    (cell,) = [c.id for c in expand(parse_study(study))]
    proc = moelab_run(path, workdir)
    wait_until_logged(proc, workdir, "orphan", cell, 30)
    kill_study(proc)
    run_dir = workdir / "ray_results" / "orphan" / cell
    orphans = sorted(p.name for p in run_dir.glob("checkpoint_*") if p.is_dir())
    assert orphans, "no checkpoint folder to orphan"
    (run_dir / RAY_TRAIN_SNAPSHOT).unlink()  # the state a kill before the first registration leaves

    assert moelab_run(path, workdir).wait(timeout=600) == 0
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("orphan")
    (run,) = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    assert run.info.status == "FINISHED" and "moelab.resumed_from_step" not in run.data.tags  # restarted from 0
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(10, 101, 10))
    assert_one_point_per_step(client, run)
    left = {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert not left & set(orphans)  # pruned
    assert left == registered_checkpoints(str(run_dir)) and len(left) == 2  # what Ray keeps (num_to_keep)


def test_killed_train_worker_restarts_the_cell_from_its_checkpoint(tmp_path):
    study = dict(STUDY, name="workerkill", routers=[{"name": "topk", "k": 2}],
                 resources=dict(STUDY["resources"], max_failures=1))
    path, workdir = tmp_path / "workerkill.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(study))
    (cell,) = [c.id for c in expand(parse_study(study))]
    proc = moelab_run(path, workdir)
    wait_until_logged(proc, workdir, "workerkill", cell, 30)
    workers = train_workers_of(proc)
    assert workers, "no Ray Train worker process found"
    for worker in workers:
        worker.kill()
    assert proc.wait(timeout=600) == 0  # Ray Train restarted the worker group; the cell finished
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("workerkill")
    (run,) = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    assert run.info.status == "FINISHED"
    assert int(run.data.tags["moelab.resumed_from_step"]) >= 20  # restarted from the checkpoint, not from 0
    steps = [m.step for m in sorted(client.get_metric_history(run.info.run_id, "train/loss"), key=lambda m: m.timestamp)]
    assert steps == list(range(10, 101, 10))
    assert_one_point_per_step(client, run)
