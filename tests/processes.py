"""Helpers for tests that drive `moelab` as a separate process (so it can be killed like a user's terminal)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

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


def tail(log: Path, lines: int = 40) -> str:
    return "\n".join(log.read_text(errors="replace").splitlines()[-lines:]) if log.exists() else "(no log)"
