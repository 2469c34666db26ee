"""Which routing metrics predict validation loss, on hand-made runs: Pearson r and Spearman rho as scipy computes
them, Fisher's interval as the formula gives it (and covering the true r in simulation), dense cells left out."""
from __future__ import annotations

import math

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from workflows.report.predictors import fisher_interval, predictors, predictors_report
from workflows.study.cells import expand
from workflows.study.loading import parse_study

STUDY = {"name": "predict", "seeds": [0, 1, 2],
         "routers": [{"name": "topk", "k": 2}, {"name": "topk", "k": 1}, {"name": "hash"},
                     {"name": "dense", "active_experts": 2}],
         "models": [{"name": "gpt", "num_experts": 4}], "datasets": [{"name": "builtin:domains"}]}


def test_correlations_over_the_moe_cells(tmp_path):
    cells = expand(parse_study(STUDY))
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment("predict", artifact_location=(tmp_path / "art").as_uri())
    rng = np.random.default_rng(0)
    runs, xs, ys = {}, [], []
    for cell in cells:
        run = client.create_run(experiment)
        cv = float(rng.uniform(0.1, 1.0))
        loss = 5.0 + 0.5 * cv + float(rng.normal(0, 0.05))
        client.log_metric(run.info.run_id, "eval/loss", loss)
        if cell.router.name != "dense":
            client.log_metric(run.info.run_id, "eval/moe/load_cv", cv)
            client.log_metric(run.info.run_id, "eval/moe/utilization", 0.7)  # constant: no correlation to report
            xs.append(cv)
            ys.append(loss)
        client.set_terminated(run.info.run_id, "FINISHED")
        runs[cell.id] = client.get_run(run.info.run_id)
    (found,) = predictors(cells, runs)
    assert found.metric == "eval/moe/load_cv" and found.n == 9  # 3 MoE routers x 3 seeds; dense left out
    assert found.r == pytest.approx(stats.pearsonr(xs, ys).statistic)
    assert found.p == pytest.approx(stats.pearsonr(xs, ys).pvalue)
    assert found.rho == pytest.approx(stats.spearmanr(xs, ys).statistic)
    z, half = math.atanh(found.r), 1.959964 / math.sqrt(9 - 3)
    assert (found.low, found.high) == pytest.approx((math.tanh(z - half), math.tanh(z + half)), rel=1e-5)
    assert "| eval/moe/load_cv |" in predictors_report(cells, runs)


def test_fishers_interval_covers_the_true_correlation_about_95_percent_of_the_time():
    rng = np.random.default_rng(1)
    true_r, n, covered = 0.6, 30, 0
    cov = [[1, true_r], [true_r, 1]]
    for _ in range(2000):
        x, y = rng.multivariate_normal([0, 0], cov, n).T
        low, high = fisher_interval(float(np.corrcoef(x, y)[0, 1]), n)
        covered += low <= true_r <= high
    assert covered / 2000 == pytest.approx(0.95, abs=0.015)
