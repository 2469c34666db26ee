"""Helpers for tests that drive `moelab` as a separate process (so it can be killed like a user's terminal)."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import psutil

REPO = Path(__file__).resolve().parents[1]


def moelab_process(command: str, study: Path, workdir: Path, log: Path | None = None) -> subprocess.Popen:
    """`moelab COMMAND STUDY --workdir DIR` in its own session: os.killpg kills it with its local Ray cluster.
    log: where its stdout and stderr go (for a failure message); discarded otherwise."""
    out = open(log, "w") if log else subprocess.DEVNULL
    try:
        return subprocess.Popen([sys.executable, "-m", "workflows.driver.cli", command, str(study), "--workdir",
                                 str(workdir)], cwd=REPO, start_new_session=True, stdout=out, stderr=subprocess.STDOUT)
    finally:
        if log:
            out.close()  # the child holds its own descriptor


def kill_study(proc: subprocess.Popen, timeout: float = 60) -> None:
    """SIGKILL a `moelab_process` and every process it started, and wait until all of them are gone. os.killpg alone
    misses Ray's worker processes (the raylet starts them in process groups of their own; they exit only once they
    notice the raylet is gone), and a Ray Train controller or worker that outlives the kill by a moment can still
    write its checkpoint record after the test has started to inspect or alter what the kill left."""
    try:
        tree = psutil.Process(proc.pid).children(recursive=True)
    except psutil.NoSuchProcess:
        tree = []
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    for child in tree:
        try:
            child.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(timeout)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    assert not alive, f"still running after SIGKILL: {[p.pid for p in alive]}"


def interrupt_study(proc: subprocess.Popen, timeout: float = 120) -> int:
    """Ctrl-C for a `moelab_process`: SIGINT to the driver alone, as a terminal delivers it to the foreground
    command. Returns its exit code, once it and every process it had started are gone (a straggler is killed: by
    its id, taken from the driver's own tree before the signal)."""
    return stop_study(proc, signal.SIGINT, timeout)[0]


def stop_study(proc: subprocess.Popen, sig: signal.Signals, timeout: float = 120) -> tuple[int, list[int]]:
    """Send `sig` to the driver alone; returns its exit code and the ids of the processes it had started that were
    still alive `timeout` seconds after it ended (each then killed, by that id)."""
    tree = psutil.Process(proc.pid).children(recursive=True)
    os.kill(proc.pid, sig)
    code = proc.wait(timeout)
    _, alive = psutil.wait_procs(tree, timeout=timeout)
    for straggler in alive:
        straggler.kill()
    psutil.wait_procs(alive, timeout=timeout)
    return code, [p.pid for p in alive]


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"


def experiment_created(db: Path, name: str) -> bool:
    """Whether a study process has created its MLflow experiment in this SQLite file, read with plain sqlite3: an
    MlflowClient opened on a database another process is still creating runs MLflow's schema setup a second time,
    and the two setups collide ("table ... already exists" kills the study)."""
    import sqlite3

    if not db.exists():
        return False
    try:
        with sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=1) as connection:
            return connection.execute("SELECT 1 FROM experiments WHERE name = ?", (name,)).fetchone() is not None
    except sqlite3.Error:  # no experiments table yet, or a write lock held a moment
        return False
