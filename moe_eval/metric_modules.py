"""Load the `evaluate` metric modules shipped in moe_eval/metrics/ by path: `evaluate.load("rouge")` would download
the hub's script, which fails offline. A new metric is one folder there (`<name>/<name>.py`)."""
from __future__ import annotations

from pathlib import Path

METRICS_DIR = Path(__file__).resolve().parent / "metrics"


def load_metric(name: str):
    import evaluate

    path = METRICS_DIR / name
    if not (path / f"{name}.py").is_file():
        valid = sorted(p.name for p in METRICS_DIR.iterdir() if (p / f"{p.name}.py").is_file())
        raise ValueError(f"unknown metric module {name!r}; valid: {', '.join(valid)}")
    return evaluate.load(str(path), keep_in_memory=True)  # in memory: concurrent cells share no cache files
