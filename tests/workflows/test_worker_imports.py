"""What a Ray Train worker imports before its first step, counted by the interpreter's sys.modules (not by the clock:
speed targets live in bench/): nothing a cell may never use. torch._dynamo (~1 s) only when a cell compiles,
matplotlib only when a finished cell draws its heatmaps."""
from __future__ import annotations

import json
import subprocess
import sys

from tests.processes import REPO

NOT_AT_WORKER_START = ("torch._dynamo", "matplotlib", "workflows.driver", "workflows.report", "tuning.runner")


def modules_after(statement: str) -> list[str]:
    code = (f"import json, sys\n{statement}\n"
            f"print(json.dumps([m for m in {NOT_AT_WORKER_START!r} if m in sys.modules]))")
    done = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_worker_entry_point_imports_nothing_a_cell_may_not_use():
    assert modules_after("import workflows.cell.train_cell") == []


def test_compiling_puts_the_eager_marks_on_the_host_read_paths():
    statement = ("from moe_models.dispatch.stacked_experts import StackedExperts, keep_host_read_paths_eager\n"
                 "keep_host_read_paths_eager(); keep_host_read_paths_eager()\n"
                 "assert StackedExperts.padded._moelab_eager and StackedExperts.sliced._moelab_eager\n"
                 "assert getattr(StackedExperts.padded, '_torchdynamo_disable', False)")
    assert modules_after(statement) == ["torch._dynamo"]
