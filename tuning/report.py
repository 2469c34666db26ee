"""Sweep results read back from MLflow: the trials table, the best configuration per router, metric-vs-parameter plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Run

from tuning.sweep_config import SweepConfig
from workflows.tracking import REASON, TRIAL


def trial_rows(runs: list[Run], sweep: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        params = {path: run.data.params.get(f"sweep.{path}") for path in sweep.space}
        rows.append({"trial": run.data.tags.get(TRIAL), "router": run.data.tags.get("router"),
                     "model": run.data.tags.get("model"), "dataset": run.data.tags.get("dataset"),
                     "status": run.info.status, "early_stopped": run.data.tags.get("moelab.early_stopped") == "true",
                     "steps": run.data.metrics.get("train/step"), sweep.metric: run.data.metrics.get(sweep.metric),
                     "reason": run.data.tags.get(REASON), **params})
    return sorted(rows, key=lambda r: (r["router"] or "", r["trial"] or ""))


def best_per_router(rows: list[dict[str, Any]], sweep: SweepConfig) -> list[dict[str, Any]]:
    best: dict[tuple, dict[str, Any]] = {}
    sign = 1 if sweep.mode == "min" else -1
    for row in rows:
        value = row[sweep.metric]
        if row["status"] != "FINISHED" or value is None:
            continue
        key = (row["router"], row["model"], row["dataset"])
        if key not in best or sign * value < sign * best[key][sweep.metric]:
            best[key] = row
    return [best[k] for k in sorted(best)]


def markdown(rows: list[dict[str, Any]], columns: list[str]) -> str:
    def fmt(v: Any) -> str:
        return "—" if v is None else f"{v:.4g}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "|".join("---" for _ in columns) + "|"]
    lines += ["| " + " | ".join(fmt(r.get(c)) for c in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def best_table(rows: list[dict[str, Any]], sweep: SweepConfig) -> str:
    cols = ["router", "model", "dataset", sweep.metric, *sweep.space, "trial"]
    return f"### Sweep {sweep.name}: best {sweep.metric} ({sweep.mode}) per router\n\n" + markdown(
        best_per_router(rows, sweep), cols)


def plot_metric_vs_params(rows: list[dict[str, Any]], sweep: SweepConfig, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    dims = list(sweep.space)
    fig, axes = plt.subplots(1, len(dims), figsize=(4 * len(dims), 3.2), squeeze=False)
    for ax, dim in zip(axes[0], dims):
        for router in sorted({r["router"] for r in rows}):
            pts = [(r[dim], r[sweep.metric]) for r in rows if r["router"] == router and r[sweep.metric] is not None]
            xs = [_number(x) for x, _ in pts]
            ax.scatter(xs, [y for _, y in pts], label=router, s=18)
        if sweep.space[dim].kind == "loguniform":
            ax.set_xscale("log")
        ax.set_xlabel(dim)
        ax.set_ylabel(sweep.metric)
    axes[0][0].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _number(value: Any) -> float:
    """Params come back from MLflow as strings; 'None' (no dropping) is drawn at 0."""
    try:
        return float(value)
    except (TypeError, ValueError):
        return 0.0
