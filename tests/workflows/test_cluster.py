"""Scale-out path with real processes: a two-node Ray cluster on loopback (`ray start --head` + a second
`ray start --address`), a real `mlflow server`, a study submitted with `ray job submit`; plus the guards that refuse
driver-local tracking and storage on a multi-node cluster. Everything started here is stopped here."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Iterator

import psutil
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.processes import REPO
from tests.suite import extended

pytestmark = [pytest.mark.slow, extended(
    "tests/workflows/test_cluster_config.py::test_cluster_yaml_passes_rays_schema_and_installs_moelab_on_every_node",
    "tests/workflows/test_cli_guards.py::test_an_unreachable_tracking_server_is_named_with_exit_2",
    "tests/workflows/test_end_to_end.py::test_every_cell_finished_with_provenance_and_metrics")]

STUDY = {
    "name": "cluster",
    "routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}, {"name": "hash"}],
    "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 4, "micro_batch_size": 4, "seq_len": 16, "warmup_steps": 1, "log_interval": 2,
                 "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 2},
}


_HANDED_OUT: set[int] = set()


def free_ports(n: int) -> list[int]:
    """n ports free now and never handed out before in this session: separate calls used to return the same
    just-released port twice (once the head's dashboard and its runtime-env agent both got 46111)."""
    ports: list[int] = []
    while len(ports) < n:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        if port not in _HANDED_OUT and not 20000 <= port < 22000:  # the nodes' worker port ranges
            _HANDED_OUT.add(port)
            ports.append(port)
    return ports


def node_ports(worker_range: tuple[int, int]) -> list[str]:
    """Every port a raylet opens, distinct per node: two nodes share one host here."""
    manager, objects, agent, agent_grpc, metrics, runtime_env = free_ports(6)
    return [f"--node-manager-port={manager}", f"--object-manager-port={objects}",
            f"--dashboard-agent-listen-port={agent}", f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--metrics-export-port={metrics}", f"--runtime-env-agent-port={runtime_env}",
            f"--min-worker-port={worker_range[0]}", f"--max-worker-port={worker_range[1]}"]


def wait_http(url: str, tries: int = 300) -> None:
    for _ in range(tries):
        try:
            with urllib.request.urlopen(url, timeout=2):
                return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"{url} never answered")


def wait_alive_nodes(ray: str, address: str, env: dict, count: int, tries: int = 100) -> None:
    for _ in range(tries):
        status = subprocess.run([ray, "status", "--address", address], env=env, capture_output=True, text=True).stdout
        if status.count("\n 1 node_") >= count:
            return
        time.sleep(1)
    pytest.fail(f"the cluster never had {count} alive nodes")


def run_checked(cmd: list[str], env: dict) -> None:
    """A setup command that must succeed; on failure the test says which, with its stderr."""
    try:
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired as err:
        pytest.fail(f"{' '.join(cmd[:3])} ... hung for 300 s:\n{(err.stderr or b'')[-3000:]!r}")
    if proc.returncode:
        pytest.fail(f"{' '.join(cmd[:3])} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}{proc.stdout[-1000:]}")


def ray_processes(temp_dir: Path) -> list[psutil.Process]:
    """The processes of the cluster this test started: the nodes' daemons, whose command lines name the test's own
    temp dir (made by mkdtemp, so no other Ray has it), and their descendants (workers retitle themselves
    `ray::...`, so only their parentage says whose they are)."""
    daemons = []
    for process in psutil.process_iter(["pid", "cmdline"]):
        if process.pid != os.getpid() and str(temp_dir) in " ".join(process.info["cmdline"] or []):
            daemons.append(process)
    found = {p.pid: p for p in daemons}
    for daemon in daemons:
        with contextlib.suppress(psutil.NoSuchProcess):
            found.update({child.pid: child for child in daemon.children(recursive=True)})
    return list(found.values())


def stop_processes(processes: list[psutil.Process], grace_s: float = 15) -> None:
    """SIGTERM, then SIGKILL whatever is still there after `grace_s`: these processes, by id, and no others."""
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.terminate()
    _, alive = psutil.wait_procs(processes, timeout=grace_s)
    for process in alive:
        with contextlib.suppress(psutil.NoSuchProcess):
            process.kill()
    psutil.wait_procs(alive, timeout=grace_s)


@contextlib.contextmanager
def two_node_cluster(root: Path, worker_args: tuple[str, ...] = (), temp_dir: Path | None = None) -> Iterator[dict]:
    """Head (1 CPU, dashboard + job server) and a worker node (1 CPU), both on 127.0.0.1; an MLflow server.

    Every node has this cluster's own Ray temp dir, so nothing else (a later `ray.init()`) finds and joins it, and
    whatever step fails, everything started so far is stopped. `worker_args` go to the worker node's `ray start`
    (the hygiene test makes that step fail); `temp_dir`: the cluster's Ray temp dir, made here when not given."""
    gcs, dashboard, mlflow_port = free_ports(3)
    # Ray 2.60 clusters authenticate with a token; every process of this cluster (nodes, job submission, moelab)
    # gets the same one through the environment, as a real deployment would through a secret.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray = str(Path(sys.executable).parent / "ray")
    temp_dir = temp_dir or short_temp_dir()
    server = None
    try:
        run_checked([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                     f"--temp-dir={temp_dir}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
                     f"--dashboard-port={dashboard}", *node_ports((20000, 20999))], env)
        run_checked([ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                     f"--temp-dir={temp_dir}", *node_ports((21000, 21999)), *worker_args], env)
        server = subprocess.Popen(
            [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
             "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1", "--port",
             str(mlflow_port), "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            start_new_session=True)
        wait_http(f"http://127.0.0.1:{mlflow_port}/health")
        wait_alive_nodes(ray, f"127.0.0.1:{gcs}", env, 2)
        yield {"root": root, "env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}",
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "ray": ray, "temp_dir": temp_dir}
    finally:
        if server is not None:
            os.killpg(server.pid, signal.SIGTERM)
            server.wait(timeout=30)
        # This cluster's processes only: `ray stop` would stop every Ray node on the machine, anyone's.
        stop_processes(ray_processes(temp_dir))
        shutil.rmtree(temp_dir, ignore_errors=True)
        assert ray_processes(temp_dir) == [], "a process of the test cluster outlived it"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    with two_node_cluster(tmp_path_factory.mktemp("cluster")) as started:
        yield started


def short_temp_dir() -> Path:
    return Path(tempfile.mkdtemp(prefix="ray-", dir="/tmp"))  # short: Ray's socket paths must fit 107 bytes


def test_a_cluster_that_fails_to_start_leaves_no_ray_process(tmp_path):
    """The worker node's `ray start` fails (a bad argument, as fast a failure as any): the head that already started
    is stopped, and the failure shows that command's stderr."""
    temp_dir = short_temp_dir()
    with pytest.raises(pytest.fail.Exception) as failed:
        with two_node_cluster(tmp_path, worker_args=("--num-cpus=many",), temp_dir=temp_dir) as started:
            pytest.fail(f"the cluster started although its worker node could not join: {started}")
    message = str(failed.value)
    assert "ray start --address" in message and "exited" in message and "'many' is not a valid integer" in message
    assert ray_processes(temp_dir) == []  # the head that had started is gone


def test_submitted_study_runs_cells_on_both_nodes_and_logs_to_the_mlflow_server(cluster):
    root = cluster["root"]
    study = root / "cluster.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    job = subprocess.run(
        [cluster["ray"], "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
         "python", "-m", "workflows.driver.cli", "run", str(study), "--workdir", str(root / "work"),
         "--tracking-uri", cluster["mlflow"], "--storage-path", str(root / "shared")],
        env=cluster["env"], capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-12000:] + job.stderr[-3000:]
    assert "succeeded" in job.stdout

    client = MlflowClient(cluster["mlflow"])
    exp = client.get_experiment_by_name("cluster")
    runs = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    assert sorted(r.data.tags["router"] for r in runs) == ["hash", "topk(k=2)"]
    assert all(r.info.status == "FINISHED" and "eval/loss" in r.data.metrics for r in runs)
    assert len({r.data.tags["moelab.node_id"] for r in runs}) == 2  # one cell per 1-CPU node
    for run in runs:  # artifacts went through the server's proxy, from workers on either node
        assert {a.path for a in client.list_artifacts(run.info.run_id, "routing")} >= {"routing/expert_usage.png"}
    assert (root / "shared" / "ray_results").is_dir() and (root / "shared" / "cache").is_dir()
    assert not (root / "work" / "mlflow.db").exists()  # nothing tracked on the driver's disk


@pytest.mark.parametrize("extra,field", [
    (["--storage-path", "SHARED"], "--tracking-uri"),  # SQLite on the driver's disk
    (["--tracking-uri", "MLFLOW"], "--storage-path"),  # checkpoints under a node-local workdir
])
def test_multi_node_cluster_refuses_driver_local_tracking_or_storage(cluster, extra, field):
    root = cluster["root"]
    study = root / "refused.yaml"
    study.write_text(yaml.safe_dump(dict(STUDY, name="refused")))
    extra = [{"SHARED": str(root / "shared"), "MLFLOW": cluster["mlflow"]}.get(a, a) for a in extra]
    proc = subprocess.run([sys.executable, "-m", "workflows.driver.cli", "run", str(study), "--workdir", str(root / "w2"),
                           "--address", cluster["gcs"], *extra], cwd=REPO, env=cluster["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and ("other 1 node(s)" in proc.stderr or "2-node cluster" in proc.stderr)
    assert not (root / "w2" / "mlflow.db").exists()  # refused before anything was written

