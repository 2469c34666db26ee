"""Object-store storage (`--storage-path s3://...`) against a real S3 API on loopback (moto's server): prepared data
is published to the bucket and fetched by the workers, Ray Train checkpoints land there, `moelab status` sees them,
and an interrupted cell resumes from its checkpoint in the bucket without a second MLflow run. Nothing is written to
the workdir's ray_results. The server is started and stopped here."""
from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.suite import extended
from workflows import storage
from workflows.driver.cli import main
from workflows.driver.workspace import ray_checkpoints

pytestmark = pytest.mark.slow

STUDY = {
    "name": "s3study",
    "routers": [{"name": "topk", "k": 2}],
    "models": [{"name": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 4, "micro_batch_size": 4, "seq_len": 16, "warmup_steps": 1, "log_interval": 2,
                 "eval_interval": 2, "eval_batches": 1, "checkpoint_interval": 2},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 1},
}
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true"}


@pytest.fixture(scope="module")
def bucket_uri():
    import pyarrow.fs

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = subprocess.Popen([str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    saved = {k: os.environ.get(k) for k in CREDENTIALS}
    os.environ.update(CREDENTIALS)  # inherited by the local Ray cluster the CLI starts, hence by its workers
    try:
        for _ in range(100):
            try:
                urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=1)
                break
            except OSError:
                time.sleep(0.1)
        endpoint = f"127.0.0.1:{port}"
        pyarrow.fs.S3FileSystem(endpoint_override=endpoint, scheme="http", region="us-east-1",
                               allow_bucket_creation=True).create_dir("moelab")
        yield f"s3://moelab/shared?endpoint_override={endpoint}&scheme=http&region=us-east-1"
    finally:
        server.terminate()
        server.wait(timeout=10)
        for key, value in saved.items():
            os.environ.pop(key) if value is None else os.environ.__setitem__(key, value)


def test_storage_helpers_round_trip_through_the_bucket(bucket_uri, tmp_path):
    location = storage.join(bucket_uri, "notes", "a.json")
    assert location.endswith("/notes/a.json?" + bucket_uri.split("?")[1])  # the query stays last
    assert not storage.exists(location)
    storage.write_text(location, '{"x": 1}')
    assert storage.exists(location) and storage.read_text(location) == '{"x": 1}'
    local = tmp_path / "f.bin"
    local.write_bytes(b"\x00\x01" * 1000)
    remote = storage.join(bucket_uri, "cache", "f.bin")
    storage.upload(local, remote)
    fetched = storage.local_copy(remote, tmp_path / "node-cache")
    assert fetched.read_bytes() == local.read_bytes() and fetched.parent == tmp_path / "node-cache"
    assert storage.subdirectories(bucket_uri, "no") == ["notes"]
    folder = tmp_path / "tokens-x"  # a prepared shard folder travels whole, and is fetched once per node
    folder.mkdir()
    (folder / "index.json").write_text("{}")
    (folder / "train-00000.tokens.bin").write_bytes(b"\x02\x00" * 500)
    remote_folder = storage.join(bucket_uri, "cache", "tokens-x")
    storage.upload(folder, remote_folder)
    fetched = storage.local_copy(remote_folder, tmp_path / "node-cache")
    assert sorted(p.name for p in fetched.iterdir()) == ["index.json", "train-00000.tokens.bin"]
    assert (fetched / "train-00000.tokens.bin").read_bytes() == (folder / "train-00000.tokens.bin").read_bytes()


@extended("tests/workflows/test_object_storage.py::test_storage_helpers_round_trip_through_the_bucket",
          "tests/workflows/test_resume.py::test_sigkill_then_rerun_resumes_without_retraining_or_duplicates")
def test_study_with_checkpoints_and_data_in_the_bucket_resumes_from_it(bucket_uri, tmp_path, in_process_ray, capsys):
    study, work = tmp_path / "s3study.yaml", tmp_path / "work"
    study.write_text(yaml.safe_dump(STUDY))
    args = ["--workdir", str(work), "--storage-path", bucket_uri]
    assert main(["run", str(study), *args]) == 0
    assert not (work / "ray_results").exists()  # checkpoints went to the bucket, not the driver's disk
    assert any(name.startswith("tokens-") for name in _names(storage.join(bucket_uri, "cache")))  # the shard folder
    client = MlflowClient(f"sqlite:///{work / 'mlflow.db'}")
    exp = client.get_experiment_by_name("s3study")
    (run,) = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    cell_id = run.data.tags["moelab.cell_id"]
    assert ray_checkpoints(storage.join(bucket_uri, "ray_results", "s3study", cell_id))
    capsys.readouterr()
    main(["status", str(study), *args])
    status = capsys.readouterr().out
    assert cell_id in status and "FINISHED" in status and "no checkpoint" not in status and "checkpoint" in status

    client.update_run(run.info.run_id, status="RUNNING")  # as if the driver had been killed mid-cell
    assert main(["run", str(study), *args]) == 0
    runs = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.tags["moelab.resumed_from_step"] == "4"  # restored from the bucket, nothing retrained


def _names(location: str) -> list[str]:
    import pyarrow.fs

    fs, path = pyarrow.fs.FileSystem.from_uri(location)
    return [i.base_name for i in fs.get_file_info(pyarrow.fs.FileSelector(path, allow_not_found=True))]
