"""Helpers for tests that drive `moelab` as a separate process (so it can be killed like a user's terminal)."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def moelab_process(command: str, study: Path, workdir: Path) -> subprocess.Popen:
    """`moelab COMMAND STUDY --workdir DIR` in its own session: os.killpg kills it with its local Ray cluster."""
    return subprocess.Popen([sys.executable, "-m", "workflows.driver.cli", command, str(study), "--workdir", str(workdir)],
                            cwd=REPO, start_new_session=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
