"""Which routing metrics predict validation loss (the routing testbed's headline, report 001): across a study's
finished MoE cells, the correlation of each routing metric with eval/loss, with a 95% interval.

Pearson's r with Fisher's z interval (z = atanh r, standard error 1/sqrt(n - 3)), and Spearman's rho beside it (a
monotone relation that is not linear). Cells of one model and dataset are pooled over routers and seeds: the
question is whether a metric, whatever produced it, goes with a lower loss. A correlation over cells is not an effect
of the metric: a router that balances better may also differ in ways the metric does not see.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from mlflow.entities import Run
from scipy import stats

from moe_models.spec import DENSE
from workflows.metric_names import (
    EVAL_LOSS,
    EVAL_MOE_DOMAIN_EXPERT_NMI,
    EVAL_MOE_DROP_FRACTION,
    EVAL_MOE_LOAD_CV,
    EVAL_MOE_MEAN_TOPK_PROB,
    EVAL_MOE_PURITY,
    EVAL_MOE_REFERENCE_AGREEMENT,
    EVAL_MOE_ROUTER_ENTROPY_NORM,
    EVAL_MOE_UTILIZATION,
)
from workflows.report.render import render
from workflows.study.cells import Cell

ROUTING_METRICS = (EVAL_MOE_LOAD_CV, EVAL_MOE_UTILIZATION, EVAL_MOE_DROP_FRACTION, EVAL_MOE_ROUTER_ENTROPY_NORM,
                   EVAL_MOE_MEAN_TOPK_PROB, EVAL_MOE_PURITY, EVAL_MOE_DOMAIN_EXPERT_NMI, EVAL_MOE_REFERENCE_AGREEMENT)
MIN_CELLS = 5  # below it Fisher's interval (n - 3 degrees of freedom) is not worth printing


@dataclass(frozen=True)
class Predictor:
    metric: str
    model: str
    dataset: str
    n: int
    r: float
    low: float
    high: float
    p: float
    rho: float


def fisher_interval(r: float, n: int, level: float = 0.95) -> tuple[float, float]:
    """Fisher (1915): atanh(r) is approximately normal with standard error 1/sqrt(n - 3)."""
    if n <= 3 or abs(r) >= 1:
        return math.nan, math.nan
    z, half = math.atanh(r), stats.norm.ppf((1 + level) / 2) / math.sqrt(n - 3)
    return math.tanh(z - half), math.tanh(z + half)


def predictors(cells: list[Cell], runs: dict[str, Run]) -> list[Predictor]:
    """Per model x dataset and routing metric, over the finished MoE cells that logged both it and eval/loss."""
    groups: dict[tuple[str, str], list[dict[str, float]]] = {}
    for cell in cells:
        run = runs.get(cell.id)
        if cell.router.name == DENSE or run is None or run.info.status != "FINISHED":
            continue
        groups.setdefault((cell.model.display(), cell.dataset.name), []).append(run.data.metrics)
    out = []
    for (model, dataset), metrics in groups.items():
        for metric in ROUTING_METRICS:
            pairs = [(m[metric], m[EVAL_LOSS]) for m in metrics
                     if metric in m and EVAL_LOSS in m and math.isfinite(m[metric])]
            if len(pairs) < MIN_CELLS or np.ptp([x for x, _ in pairs]) == 0:
                continue
            x, y = np.array(pairs).T
            r, p = stats.pearsonr(x, y)
            low, high = fisher_interval(float(r), len(pairs))
            rho = float(stats.spearmanr(x, y).statistic)
            out.append(Predictor(metric, model, dataset, len(pairs), float(r), low, high, float(p), rho))
    return out


def predictors_report(cells: list[Cell], runs: dict[str, Run], fmt: str = "md") -> str:
    found = predictors(cells, runs)
    if not found:
        return ""
    headers = ["routing metric", "model / dataset", "cells", "Pearson r [95% CI]", "p", "Spearman rho"]
    rows = [{"routing metric": f.metric, "model / dataset": f"{f.model} / {f.dataset}", "cells": str(f.n),
             "Pearson r [95% CI]": f"{f.r:.2f} [{f.low:.2f}, {f.high:.2f}]", "p": f"{f.p:.3g}",
             "Spearman rho": f"{f.rho:.2f}"} for f in sorted(found, key=lambda f: -abs(f.r))]
    table = render(headers, rows, fmt)
    if fmt != "md":
        return table
    return table + (f"\n- Across the finished MoE cells (routers and seeds pooled): a negative r means the metric "
                    f"goes with a lower validation loss. Fisher-z intervals; shown from {MIN_CELLS} cells. A "
                    "correlation over cells is not an effect of the metric.\n")
