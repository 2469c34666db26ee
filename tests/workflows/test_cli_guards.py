"""What `moelab` does before any work: an unreachable tracking server is named at once, read-only commands on a
workdir where nothing ran write nothing, and prepared data files cannot run code when loaded."""
from __future__ import annotations

import os
import pickle
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moe_data.prepare import load_prepared, prepare
from moe_data.spec import DataSpec
from tests.processes import REPO

QUICKSTART = REPO / "studies" / "quickstart.yaml"


def moelab(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`moelab ...` as a user runs it; `timeout` only guards against a hang (generous: CI's 2 cores run a Ray
    cluster beside it)."""
    return subprocess.run([sys.executable, "-m", "workflows.driver.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=timeout)


def closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]  # released on exit: nothing listens there


@pytest.mark.parametrize("command", ["run", "status", "aggregate"])
def test_an_unreachable_tracking_server_is_named_with_exit_2(command, tmp_path):
    uri = f"http://127.0.0.1:{closed_port()}/"
    proc = moelab(command, str(QUICKSTART), "--workdir", str(tmp_path / "w"), "--tracking-uri", uri, timeout=15)
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert f"MLflow tracking server {uri} is unreachable" in proc.stderr and "/health" in proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""
    assert not (tmp_path / "w").exists()


@pytest.mark.parametrize("command", [["status"], ["aggregate"], ["aggregate", "--format", "csv"]])
def test_read_only_commands_on_a_workdir_where_nothing_ran_write_nothing(command, tmp_path):
    workdir = tmp_path / "never-ran"
    proc = moelab(command[0], str(QUICKSTART), "--workdir", str(workdir), *command[1:])
    assert proc.returncode == 2, proc.stderr[-2000:]
    assert "no study 'quickstart' here" in proc.stderr and str(workdir) in proc.stderr
    assert proc.stdout == "" and not workdir.exists()


def test_routers_on_a_study_that_never_ran_is_refused_before_any_profiling_and_writes_nothing(tmp_path, capsys,
                                                                                                 monkeypatch):
    """Profiling takes seconds idle and minutes on a loaded machine: a wrong workdir must not wait for it."""
    import moe_models.characterize

    from workflows.driver.cli import main

    def profiled(*args, **kwargs):
        raise AssertionError("profiled before the study's workdir was checked")

    monkeypatch.setattr(moe_models.characterize, "profile_all", profiled)
    workdir = tmp_path / "never-ran"
    assert main(["routers", "--study", str(QUICKSTART), "--workdir", str(workdir), "--tokens", "64"]) == 2
    assert "no study 'quickstart' here" in capsys.readouterr().err
    assert not workdir.exists()


def test_a_workdir_of_another_study_is_not_this_study(tmp_path, capsys):
    """The database exists (another study ran there): still nothing of this study, and no experiment created."""
    from mlflow.tracking import MlflowClient

    from workflows.driver.cli import main

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    MlflowClient(uri).create_experiment("other")
    assert main(["status", str(QUICKSTART), "--workdir", str(tmp_path)]) == 2
    assert "no study 'quickstart' in" in capsys.readouterr().err
    assert {e.name for e in MlflowClient(uri).search_experiments()} == {"other", "Default"}


class RunsCode:
    """A pickled object whose loading would run a command."""

    def __reduce__(self):
        return (os.system, ("touch /tmp/moelab-pwned",))


def test_prepared_files_load_as_plain_data_and_never_unpickle_objects(tmp_path):
    path = prepare(DataSpec("builtin:docstrings", 300, 20_000), tmp_path)
    assert load_prepared(path).vocab_size == 300  # what prepare writes is tensors, numbers and text
    hostile = tmp_path / "data-hostile-300.pt"
    torch.save({"tokens": RunsCode()}, hostile)
    with pytest.raises(pickle.UnpicklingError, match="Weights only load failed"):
        load_prepared(hostile)
    assert not Path("/tmp/moelab-pwned").exists()


@pytest.mark.parametrize("threads", [1, 2])
def test_routers_profile_on_the_threads_asked_for(threads, capsys, monkeypatch):
    """Beside a running study torch's default (every core) oversubscribes them: the driver's compute takes --threads,
    default 1."""
    import moe_models.characterize

    from workflows.driver.cli import main

    seen = []

    def profiled(*args, **kwargs):
        seen.append(torch.get_num_threads())
        return []

    monkeypatch.setattr(moe_models.characterize, "profile_all", profiled)
    before = torch.get_num_threads()
    try:
        argv = ["routers", "--format", "json"] + (["--threads", str(threads)] if threads != 1 else [])
        assert main(argv) == 0
    finally:
        torch.set_num_threads(before)
    assert seen == [threads] and capsys.readouterr().out.strip() == "[]"


@pytest.mark.parametrize("command", [["routers"], ["calibrate", str(QUICKSTART), "--router", "top_p", "--target", "2"]])
def test_zero_threads_is_refused_with_the_option_named(command, capsys):
    from workflows.driver.cli import main

    assert main([*command, "--threads", "0"]) == 2
    assert "--threads" in capsys.readouterr().err
