"""Scale-out path with real processes: a two-node Ray cluster on loopback (`ray start --head` + a second
`ray start --address`), a real `mlflow server`, a study submitted with `ray job submit`; plus the guards that refuse
driver-local tracking and storage on a multi-node cluster. Everything started here is stopped here."""
from __future__ import annotations

import os
import secrets
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.processes import REPO

pytestmark = pytest.mark.slow

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


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """Head (1 CPU, dashboard + job server) and a worker node (1 CPU), both on 127.0.0.1; an MLflow server."""
    root = tmp_path_factory.mktemp("cluster")
    gcs, dashboard, mlflow_port = free_ports(3)
    # Ray 2.60 clusters authenticate with a token; every process of this cluster (nodes, job submission, moelab)
    # gets the same one through the environment, as a real deployment would through a secret.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}", "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
    ray = str(Path(sys.executable).parent / "ray")
    subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)
    subprocess.run([ray, "start", "--head", "--node-ip-address=127.0.0.1", f"--port={gcs}", "--num-cpus=1",
                    "--include-dashboard=true", "--dashboard-host=127.0.0.1", f"--dashboard-port={dashboard}",
                    *node_ports((20000, 20999))], env=env, check=True, capture_output=True)
    subprocess.run([ray, "start", f"--address=127.0.0.1:{gcs}", "--node-ip-address=127.0.0.1", "--num-cpus=1",
                    *node_ports((21000, 21999))], env=env, check=True, capture_output=True)
    server = subprocess.Popen(
        [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", f"sqlite:///{root / 'server.db'}",
         "--artifacts-destination", str(root / "server-artifacts"), "--host", "127.0.0.1", "--port", str(mlflow_port),
         "--workers", "1"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    try:
        wait_http(f"http://127.0.0.1:{mlflow_port}/health")
        wait_alive_nodes(ray, f"127.0.0.1:{gcs}", env, 2)
        yield {"root": root, "env": env, "gcs": f"127.0.0.1:{gcs}", "dashboard": f"http://127.0.0.1:{dashboard}",
               "mlflow": f"http://127.0.0.1:{mlflow_port}", "ray": ray}
    finally:
        os.killpg(server.pid, 15)
        server.wait(timeout=30)
        subprocess.run([ray, "stop", "--force"], env=env, capture_output=True)


def test_submitted_study_runs_cells_on_both_nodes_and_logs_to_the_mlflow_server(cluster):
    root = cluster["root"]
    study = root / "cluster.yaml"
    study.write_text(yaml.safe_dump(STUDY))
    job = subprocess.run(
        [cluster["ray"], "job", "submit", "--address", cluster["dashboard"], "--working-dir", str(REPO), "--",
         "python", "-m", "workflows.cli", "run", str(study), "--workdir", str(root / "work"),
         "--tracking-uri", cluster["mlflow"], "--storage-path", str(root / "shared")],
        env=cluster["env"], capture_output=True, text=True, timeout=900)
    assert job.returncode == 0, job.stdout[-3000:] + job.stderr[-3000:]
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
    proc = subprocess.run([sys.executable, "-m", "workflows.cli", "run", str(study), "--workdir", str(root / "w2"),
                           "--address", cluster["gcs"], *extra], cwd=REPO, env=cluster["env"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert field in proc.stderr and ("other 1 node(s)" in proc.stderr or "2-node cluster" in proc.stderr)
    assert not (root / "w2" / "mlflow.db").exists()  # refused before anything was written
