"""Kill the driver (SIGKILL, its whole process tree) after a checkpoint, then a Ray Train worker of the rerun: the same
command resumes, and Ray Train restarts the worker group from its checkpoint; and a kill before Ray Train registered a
checkpoint restarts the cell from step 0 without repeating a step."""
import contextlib
import signal
import subprocess
import time
from dataclasses import dataclass
from pathlib import Path

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.suite import extended
from tests.processes import experiment_created, kill_study, moelab_process, stop_study, tail
from workflows.driver.launch import RAY_TRAIN_SNAPSHOT, prune_orphaned_checkpoints, registered_checkpoints
from workflows.study.cells import expand
from workflows.study.loading import parse_study

pytestmark = pytest.mark.slow

STEPS = 400
STUDY = {
    "name": "resume",
    "routers": [{"name": "hash"}, {"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}],
    # A small model: the kills are placed by logged steps, so a step needs only to outlast the MLflow poll (0.2 s per
    # 10 steps), and what the tests measure is orchestration, not compute.
    "models": [{"name": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 128}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": STEPS, "micro_batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_interval": 10,
                 "eval_interval": 50, "eval_batches": 2, "checkpoint_interval": 20},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 1},
}


def moelab_run(study: Path, workdir: Path) -> subprocess.Popen:
    return moelab_process("run", study, workdir, log=workdir.parent / "moelab.log")


def wait_until_logged(proc: subprocess.Popen, workdir: Path, study: str, cell_id: str, step: int) -> None:
    """Poll MLflow until the cell has logged `step`. Killing only after the cell moved past a checkpoint avoids
    the window between a checkpoint directory appearing and Ray Train registering it (a kill there restarts from
    the previous checkpoint, which is correct but not what these tests check)."""
    client = None  # opened once the study created its database: opening one creates it (and races the study's setup)
    for _poll in range(3000):  # bounded wait, a hang guard
        if client is None and experiment_created(workdir / "mlflow.db", study):
            client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
        exp = client.get_experiment_by_name(study) if client else None
        runs = client.search_runs([exp.experiment_id], f"tags.`moelab.cell_id` = '{cell_id}'") if exp else []
        if runs and any(m.step >= step for m in client.get_metric_history(runs[0].info.run_id, "train/loss")):
            return
        assert proc.poll() is None, f"study ended before the kill point:\n{tail(workdir.parent / 'moelab.log')}"
        time.sleep(0.2)
    pytest.fail(f"cell {cell_id} never reached step {step}")


def wait_until_registered(proc: subprocess.Popen, run_dir: Path, besides: set[str] = frozenset()) -> set[str]:
    """Poll Ray Train's own record until it has registered a checkpoint of this cell other than `besides`. A kill
    after that resumes from it; a kill between a checkpoint folder appearing and its registration would restart
    from the previous one (correct, tested with unit tests, but not what these tests check), and a small model
    crosses that window in a fraction of a second."""
    for _poll in range(3000):  # bounded wait, a hang guard
        registered = registered_checkpoints(str(run_dir)) or set()
        if registered - set(besides):
            return registered
        assert proc.poll() is None, f"study ended before the kill point:\n{tail(run_dir.parents[2].parent / 'moelab.log')}"
        time.sleep(0.05)
    pytest.fail(f"no checkpoint of {run_dir.name} was registered")


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


@dataclass
class KilledTwice:
    """One study interrupted twice: the driver SIGKILLed while its second cell trains, then, in the rerun that
    resumes it, that cell's Ray Train worker killed. The resume tests read what each kill left."""

    client: MlflowClient
    experiment_id: str
    first: str  # cell ids, in order
    second: str
    before: dict  # cell id -> run, after the driver's kill
    first_resume: int  # the step the rerun resumed the second cell from
    after: dict  # cell id -> run, once the rerun finished


def cell_runs(client: MlflowClient, experiment_id: str) -> dict:
    return {r.data.tags["moelab.cell_id"]: r for r in client.search_runs([experiment_id], "tags.`moelab.role` = 'cell'")}


def resumed_from(client: MlflowClient, proc: subprocess.Popen, run_id: str) -> int:
    """The step the rerun's worker resumed from, once it has said so on the run."""
    for _poll in range(3000):  # bounded wait, a hang guard
        tag = client.get_run(run_id).data.tags.get("moelab.resumed_from_step")
        if tag:
            return int(tag)
        assert proc.poll() is None, "the rerun ended before resuming the cell"
        time.sleep(0.2)
    pytest.fail("the rerun never resumed the cell")


@pytest.fixture(scope="module")
def killed_twice(tmp_path_factory) -> KilledTwice:
    root = tmp_path_factory.mktemp("resume")
    path, workdir = root / "resume.yaml", root / "work"
    path.write_text(yaml.safe_dump(STUDY))
    first, second = [c.id for c in expand(parse_study(STUDY))]
    proc = moelab_run(path, workdir)
    run_dir = workdir / "ray_results" / "resume" / second
    wait_until_logged(proc, workdir, "resume", second, 10)  # the second cell is training
    wait_until_registered(proc, run_dir)  # ... and Ray Train holds a checkpoint of it
    kill_study(proc)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment_id = client.get_experiment_by_name("resume").experiment_id
    before = cell_runs(client, experiment_id)
    # Ray Train's own record of the killed cell's checkpoints is read as it wrote it: the folders it registered are
    # kept, and a folder it never registered (the state a kill before registration leaves) is what the rerun prunes.
    on_disk, registered = {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()}, registered_checkpoints(str(run_dir))
    assert registered and registered <= on_disk  # the kill may have caught a checkpoint before its registration
    (run_dir / "checkpoint_never_registered").mkdir()
    assert set(prune_orphaned_checkpoints(str(run_dir))) == on_disk - registered | {"checkpoint_never_registered"}

    rerun = moelab_run(path, workdir)
    try:
        first_resume = resumed_from(client, rerun, before[second].info.run_id)
        # A checkpoint registered after the resume point: Ray Train restarts its worker group from there.
        wait_until_registered(rerun, run_dir, besides=registered)
        workers = train_workers_of(rerun)
        assert workers, "no Ray Train worker process found"
        for worker in workers:
            worker.kill()
        assert rerun.wait(timeout=600) == 0, tail(workdir.parent / "moelab.log")
    finally:
        if rerun.poll() is None:
            kill_study(rerun)
    return KilledTwice(client, experiment_id, first, second, before, first_resume, cell_runs(client, experiment_id))


def test_sigkill_then_rerun_resumes_without_retraining_or_duplicates(killed_twice):
    k = killed_twice
    assert k.before[k.first].info.status == "FINISHED" and k.before[k.second].info.status == "RUNNING"
    assert set(k.after) == {k.first, k.second} and len(k.client.search_runs([k.experiment_id])) == 3  # + study run
    assert all(r.info.status == "FINISHED" for r in k.after.values())
    assert k.after[k.first].info.end_time == k.before[k.first].info.end_time  # finished cell not retrained
    assert k.after[k.second].info.run_id == k.before[k.second].info.run_id  # reopened, not duplicated
    assert k.first_resume >= 20 and k.first_resume % 20 == 0
    history = sorted(k.client.get_metric_history(k.after[k.second].info.run_id, "train/loss"), key=lambda m: m.timestamp)
    assert [m.step for m in history] == list(range(10, STEPS + 1, 10))  # steps replayed since a checkpoint: not logged again
    assert_one_point_per_step(k.client, k.after[k.second])


def test_killed_train_worker_restarts_the_cell_from_its_checkpoint(killed_twice):
    """The rerun's worker was killed 30 steps past its resume point: Ray Train restarted the worker group from the
    checkpoint 20 steps past it (not from the resume point again, not from 0), and the rerun exited 0."""
    k = killed_twice
    run = k.after[k.second]
    restarted_from = int(run.data.tags["moelab.resumed_from_step"])
    assert restarted_from >= k.first_resume + 20 and restarted_from % 20 == 0
    assert [m.step for m in k.client.get_metric_history(run.info.run_id, "train/loss")] == list(range(10, STEPS + 1, 10))
    assert_one_point_per_step(k.client, run)


def test_sigterm_as_ray_job_stop_sends_it_closes_unfinished_runs_killed_and_leaves_no_process(tmp_path):
    """`ray job stop` sends the driver SIGTERM, then SIGKILL 3 s later: within those seconds the driver closes the
    running cell's and the study's MLflow runs KILLED (not left RUNNING in the UI), stops the Ray it started, and
    exits 143. The rerun that resumes a KILLED run is the one the SIGKILL test checks (any unfinished run reopens)."""
    study = dict(STUDY, name="terminated", routers=[{"name": "topk", "k": 2}])
    path, workdir = tmp_path / "terminated.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(study))
    (cell,) = [c.id for c in expand(parse_study(study))]
    proc = moelab_run(path, workdir)
    try:
        wait_until_logged(proc, workdir, "terminated", cell, 10)
        began, signalled_at = time.monotonic(), time.time()
        code, left_running = stop_study(proc, signal.SIGTERM)
        took = time.monotonic() - began
    finally:
        if proc.poll() is None:
            kill_study(proc)
    log = tail(workdir.parent / "moelab.log")
    assert code == 128 + signal.SIGTERM, log
    assert "run the same command again to resume" in log
    assert not left_running, f"processes the study started outlived it: {left_running}"
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("terminated")
    runs = client.search_runs([exp.experiment_id])
    statuses = {r.data.tags["moelab.role"]: r.info.status for r in runs}
    assert statuses == {"cell": "KILLED", "study": "KILLED"}, statuses
    closed = max(r.info.end_time for r in runs) / 1000 - signalled_at
    print(f"SIGTERM to runs closed: {closed:.1f} s, to exit: {took:.1f} s (ray job stop sends SIGKILL after 3 s)")


@extended("tests/workflows/test_resume.py::test_sigkill_then_rerun_resumes_without_retraining_or_duplicates",
          "tests/workflows/test_checkpoints.py::test_checkpoint_folders_ray_train_never_registered_are_pruned",
          "tests/workflows/test_cell_job.py::test_a_resumed_run_logs_no_step_twice_and_the_first_metric_stays_first")
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
    assert [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")] == list(range(10, STEPS + 1, 10))
    assert_one_point_per_step(client, run)
    left = {p.name for p in run_dir.glob("checkpoint_*") if p.is_dir()}
    assert not left & set(orphans)  # pruned
    assert left == registered_checkpoints(str(run_dir)) and len(left) == 2  # what Ray keeps (num_to_keep)
