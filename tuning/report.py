"""Sweep results read back from MLflow: the trials table, the best configuration per router, metric-vs-parameter plots."""
from __future__ import annotations

from pathlib import Path
from typing import Any

from mlflow.entities import Run

from tuning.sweep_config import SweepConfig
from workflows.metric_names import TRAIN_STEP
from workflows.report.render import render
from workflows.report.numbers import parse_number, readable
from workflows.tracking import REASON, TRIAL, metric_key


def trial_rows(runs: list[Run], sweep: SweepConfig) -> list[dict[str, Any]]:
    rows = []
    for run in runs:
        params = {path: parse_number(run.data.params.get(f"sweep.{path}")) for path in sweep.space}
        rows.append({"trial": run.data.tags.get(TRIAL), "name": run.info.run_name,
                     "router": run.data.tags.get("router"),
                     "model": run.data.tags.get("model"), "dataset": run.data.tags.get("dataset"),
                     "status": run.info.status, "early_stopped": run.data.tags.get("moelab.early_stopped") == "true",
                     "steps": run.data.metrics.get(TRAIN_STEP), sweep.metric: run.data.metrics.get(sweep.metric),
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
    """The rows as a Markdown table, every number to three significant digits."""
    return render(columns, [{c: readable(r.get(c)) for c in columns} for r in rows], "md")


def best_trial(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, Any] | None:
    """The finished trial with the best value of the sweep's metric, over every base cell."""
    best = best_per_router(rows, sweep)
    sign = 1 if sweep.mode == "min" else -1
    return min(best, key=lambda row: sign * row[sweep.metric], default=None)


def sweep_run_metrics(best: dict[str, Any], sweep: SweepConfig) -> dict[str, float]:
    """The sweep run's own row in the MLflow UI: the winning trial's metric under its own name (so trials and the
    sweep chart together), and each numeric value it sampled as `best/<path>`."""
    return {sweep.metric: best[sweep.metric],
            **{f"best/{path}": float(best[path]) for path in sweep.space
               if isinstance(best[path], (int, float)) and not isinstance(best[path], bool)}}


def study_headlines(rows: list[dict[str, Any]], sweep: SweepConfig) -> dict[str, float]:
    """The study run's row: per swept router (and model, dataset when several), the sweep's best metric, named after
    the sweep so that `moelab run`'s own headlines (best_eval_loss/<router>) stay apart."""
    best = best_per_router(rows, sweep)
    several = len({(r["model"], r["dataset"]) for r in best}) > 1
    out = {}
    for row in best:
        label = " / ".join(filter(None, [row["router"], *((row["model"], row["dataset"]) if several else ())]))
        out[f"sweep-{sweep.name}/best_{metric_key(sweep.metric.replace('/', '_'))}/{metric_key(label)}"] = \
            row[sweep.metric]
    return out


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
