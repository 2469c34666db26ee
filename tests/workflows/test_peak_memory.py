"""A cell's peak memory is its own: the high-water mark is reset when the cell starts, so a reused Ray worker's earlier
task (a data-preparation batch, an earlier trial) does not count."""
from __future__ import annotations

import sys

import numpy as np
import pytest

from workflows.cell.evaluation import peak_memory_mb, reset_peak_memory


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the high-water mark reset is Linux's /proc")
def test_the_peak_is_measured_from_the_reset():
    block = np.ones(50_000_000)  # 400 MB resident
    assert block.sum() > 0
    during = peak_memory_mb()
    del block
    reset_peak_memory()
    after = peak_memory_mb()
    assert during - after > 300  # the freed 400 MB no longer count
    again = np.ones(25_000_000)
    assert again.sum() > 0 and peak_memory_mb() - after > 150  # and a new peak does
