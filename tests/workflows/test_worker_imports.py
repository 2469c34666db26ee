"""What a Ray Train worker imports at its start, counted by the interpreter's sys.modules (not by the clock: speed
targets live in bench/): nothing a cell may never use. matplotlib loads only when a finished cell draws its heatmaps;
the driver's and the report's code never load in a worker.

(torch._dynamo is not on the list: torch.optim's Optimizer imports it on construction, so every training worker pays
for it whatever moelab's own modules do.)"""
from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import REPO

NOT_AT_WORKER_START = ("matplotlib", "workflows.driver", "workflows.report", "tuning.runner", "tuning.trainable")


def test_the_worker_entry_point_imports_nothing_a_cell_may_not_use():
    code = ("import json, sys\nimport workflows.cell.train_cell\n"
            f"print(json.dumps([m for m in {NOT_AT_WORKER_START!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []
