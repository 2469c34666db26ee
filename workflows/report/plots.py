"""The study's figures, from what MLflow recorded (PNG, in the workdir and on the study's run under plots/):

- pareto.png: quality (eval loss, or ROUGE-L for summarization) against training FLOPs per token and against
  tokens/s, mean ± 95% interval across seeds on both axes, with the Pareto front drawn through the undominated
  routers;
- eval_loss_curves.png: eval loss against step per router, the mean across seeds with a band (the t-interval from 3
  seeds on, the seeds' range below that);
- expert_usage_by_router.png: every routed router's expert-usage heatmap (MoE block x expert) side by side, on one
  color scale, from its lowest seed's run.
"""
from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from moe_eval.bootstrap import t_interval
from workflows.metric_names import EVAL_LOSS
from workflows.report.pooled import MIN_SEEDS_FOR_INTERVAL, PooledRow
from workflows.study.cells import Cell
from workflows.tracking import Tracker

QUALITY_AXES = (("ROUGE-L", True), ("eval loss", False))  # (pooled column, higher is better), first present wins
COST_AXES = (("train MFLOP/token", False), ("tokens/s", True), ("ms/token", False))  # training; inference latency


def pareto_front(points: list[tuple[float, float]], x_higher: bool, y_higher: bool) -> list[int]:
    """Indices of the points no other point beats on both axes (ties count as not beaten), sorted by x."""
    def better(a: float, b: float, higher: bool) -> bool:
        return a > b if higher else a < b

    def at_least(a: float, b: float, higher: bool) -> bool:
        return a >= b if higher else a <= b

    front = [i for i, (x, y) in enumerate(points)
             if not any(at_least(ox, x, x_higher) and at_least(oy, y, y_higher)
                        and (better(ox, x, x_higher) or better(oy, y, y_higher))
                        for j, (ox, oy) in enumerate(points) if j != i)]
    return sorted(front, key=lambda i: points[i][0])


def _label(row: PooledRow, several_places: bool) -> str:
    return f"{row.router} / {row.model}" if several_places else row.router


def _err(estimate) -> float:
    return 0.0 if estimate.n < MIN_SEEDS_FOR_INTERVAL or math.isnan(estimate.half_width) else estimate.half_width


def pareto_plot(rows: list[PooledRow], path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from workflows import figures  # noqa: F401  (headless backend)

    quality = next(((h, hi) for h, hi in QUALITY_AXES if any(h in r.values for r in rows)), None)
    if quality is None:
        return None
    axes_shown = [(h, hi) for h, hi in COST_AXES if any(h in r.values for r in rows)]
    if not axes_shown:
        return None
    several = len({(r.model, r.dataset) for r in rows}) > 1
    fig, axes = plt.subplots(1, len(axes_shown), figsize=(6 * len(axes_shown), 4.5), squeeze=False)
    for ax, (cost, cost_higher) in zip(axes[0], axes_shown):
        usable = [r for r in rows if cost in r.values and quality[0] in r.values
                  and not math.isnan(r.values[cost].mean) and not math.isnan(r.values[quality[0]].mean)]
        points = [(r.values[cost].mean, r.values[quality[0]].mean) for r in usable]
        for row, (x, y) in zip(usable, points):
            ax.errorbar(x, y, xerr=_err(row.values[cost]), yerr=_err(row.values[quality[0]]), fmt="o", capsize=3)
            ax.annotate(_label(row, several), (x, y), fontsize=7, xytext=(4, 4), textcoords="offset points")
        front = pareto_front(points, cost_higher, quality[1])
        if len(front) > 1:
            ax.plot([points[i][0] for i in front], [points[i][1] for i in front], "--", color="gray", lw=1,
                    label="Pareto front")
            ax.legend(fontsize=7)
        ax.set_xlabel(cost + (" (higher is better)" if cost_higher else " (lower is better)"))
        ax.set_ylabel(quality[0] + (" (higher is better)" if quality[1] else " (lower is better)"))
        ax.grid(alpha=0.3)
    fig.suptitle("quality against compute, mean ± 95% CI across seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def loss_curves(cells: list[Cell], runs: dict[str, Run], tracker: Tracker, path: Path) -> Path | None:
    import matplotlib.pyplot as plt

    from workflows import figures  # noqa: F401

    several = len({(c.model.display(), c.dataset.name) for c in cells}) > 1
    curves: dict[str, dict[int, list[float]]] = defaultdict(lambda: defaultdict(list))  # label -> step -> values
    for cell in cells:
        run = runs.get(cell.id)
        if run is None or run.info.status != "FINISHED":
            continue
        label = f"{cell.router.display()} / {cell.model.display()}" if several else cell.router.display()
        for point in tracker.metric_history(run.info.run_id, EVAL_LOSS):
            curves[label][point.step].append(point.value)
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label, by_step in curves.items():
        steps = sorted(by_step)
        means, lows, highs = [], [], []
        for step in steps:
            values = by_step[step]
            mean, half = t_interval(values)
            if len(values) < MIN_SEEDS_FOR_INTERVAL or math.isnan(half):
                lows.append(min(values))
                highs.append(max(values))
            else:
                lows.append(mean - half)
                highs.append(mean + half)
            means.append(mean)
        (line,) = ax.plot(steps, means, marker=".", label=f"{label} ({max(len(v) for v in by_step.values())} seeds)")
        ax.fill_between(steps, lows, highs, color=line.get_color(), alpha=0.2)
    ax.set_xlabel("step")
    ax.set_ylabel("eval loss")
    ax.set_title("eval loss: mean across seeds, band = 95% CI (3+ seeds) or the seeds' range", fontsize=9)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path


def _usage_matrix(csv_text: str) -> tuple[list[str], list[list[float]]]:
    lines = [line.split(",") for line in csv_text.strip().splitlines()[1:]]
    return [f"block {line[0]}" for line in lines], [[float(v) for v in line[1:]] for line in lines]


def usage_heatmaps(cells: list[Cell], runs: dict[str, Run], tracker: Tracker, path: Path) -> Path | None:
    """One panel per router x model (its lowest finished seed), shared color scale."""
    import matplotlib.pyplot as plt

    from workflows import figures  # noqa: F401

    panels: dict[str, tuple[list[str], list[list[float]]]] = {}
    several = len({c.model.display() for c in cells}) > 1
    for cell in sorted(cells, key=lambda c: c.seed):
        label = f"{cell.router.display()} / {cell.model.display()}" if several else cell.router.display()
        run = runs.get(cell.id)
        if label in panels or run is None or run.info.status != "FINISHED":
            continue
        try:
            panels[label] = _usage_matrix(tracker.read_text(run.info.run_id, "routing/expert_usage.csv"))
        except (MlflowException, OSError):  # dense cells (and pretrained baselines) log no routing
            continue
    if not panels:
        return None
    top = max(v for _, matrix in panels.values() for row in matrix for v in row)
    fig, axes = plt.subplots(1, len(panels), figsize=(0.8 + 3.2 * len(panels), 2.8), squeeze=False)
    for n, (ax, (label, (rows, matrix))) in enumerate(zip(axes[0], panels.items())):
        image = ax.imshow(matrix, cmap="viridis", vmin=0.0, vmax=top, aspect="auto")
        ax.set_title(label, fontsize=7, wrap=True)
        ax.set_yticks(range(len(rows)), rows if n == 0 else [], fontsize=7)
        ax.set_xticks(range(len(matrix[0])))
        ax.set_xlabel("expert", fontsize=7)
    fig.colorbar(image, ax=axes[0].tolist(), label="fraction of routes")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def write_plots(cells: list[Cell], runs: dict[str, Run], rows: list[PooledRow], folder: Path, tracker: Tracker,
                parent_run_id: str | None = None) -> list[Path]:
    """The three figures in `folder` and on the study's run under plots/; the ones without data are skipped."""
    folder.mkdir(parents=True, exist_ok=True)
    made = [p for p in (pareto_plot(rows, folder / "pareto.png"),
                        loss_curves(cells, runs, tracker, folder / "eval_loss_curves.png"),
                        usage_heatmaps(cells, runs, tracker, folder / "expert_usage_by_router.png")) if p]
    if parent_run_id:
        for path in made:
            tracker.log_artifact(parent_run_id, path, "plots")
    return made

