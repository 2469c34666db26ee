"""The pooled report on hand-made MLflow runs (a real SQLite store) with known values: means and t-intervals across
seeds, the paired test against the baseline (checked against scipy), the regime check both ways, fewer than 3 seeds
said in the table, and LaTeX / HTML exports that parse."""
from __future__ import annotations

import io
import re

import numpy as np
import pandas as pd
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from workflows.report.exports import pooled_report
from workflows.report.pooled import pooled_rows, regime_verdicts
from workflows.study.cells import expand
from workflows.study.loading import parse_study

SEEDS = [0, 1, 2, 3]
STUDY = {
    "name": "pooled", "seeds": SEEDS, "baseline": "topk(k=2)",
    "routers": [{"name": "topk", "k": 2}, {"name": "hash"},
                {"name": "dense", "active_experts": 2, "label": "dense-active"},
                {"name": "dense", "active_experts": 4, "label": "dense-params"}],
    "models": [{"name": "gpt", "num_experts": 4}],
    "datasets": [{"name": "builtin:domains"}],
}
# eval loss per router and seed: hash is worse than top-2 by 0.1 + small noise; the wide dense model's edge over the
# narrow one is set by each test.
TOPK = [5.00, 5.10, 4.95, 5.05]
HASH = [5.11, 5.19, 5.06, 5.14]


def store(tmp_path, losses: dict[str, list[float]], study: dict = STUDY) -> tuple[list, dict]:
    """Finished runs with the given eval losses (and a known tokens/s), one per cell."""
    parsed = parse_study(study)
    cells = expand(parsed)
    tmp_path.mkdir(parents=True, exist_ok=True)
    client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.create_experiment(parsed.name, artifact_location=(tmp_path / "art").as_uri())
    runs = {}
    for cell in cells:
        run = client.create_run(experiment)
        values = losses[cell.router.display()]
        if cell.seed < len(values):
            client.log_metric(run.info.run_id, "eval/loss", values[cell.seed])
            client.log_metric(run.info.run_id, "summary/tokens_per_s", 1000.0 * (cell.seed + 1))
            client.set_terminated(run.info.run_id, "FINISHED")
        runs[cell.id] = client.get_run(run.info.run_id)
    return cells, runs


def test_pooled_means_intervals_and_the_paired_test_against_the_baseline(tmp_path):
    narrow = [5.20, 5.30, 5.25, 5.22]
    cells, runs = store(tmp_path, {"topk(k=2)": TOPK, "hash": HASH, "dense-active": narrow,
                                   "dense-params": [4.92, 5.01, 4.93, 4.95]})
    rows = {r.router: r for r in pooled_rows(cells, runs, "topk(k=2)")}
    hash_row = rows["hash"]
    assert hash_row.seeds == SEEDS
    loss = hash_row.values["eval loss"]
    assert loss.mean == pytest.approx(np.mean(HASH))
    assert loss.half_width == pytest.approx(stats.t.ppf(0.975, 3) * np.std(HASH, ddof=1) / 2)
    assert hash_row.values["tokens/s"].mean == pytest.approx(2500.0)
    diff = hash_row.vs_baseline
    assert diff.estimate.mean == pytest.approx(np.mean(np.subtract(HASH, TOPK)))
    assert diff.p_value == pytest.approx(stats.ttest_rel(HASH, TOPK).pvalue)
    assert diff.resolved  # 0.1 nats with little seed-to-seed spread of the difference
    assert rows["topk(k=2)"].vs_baseline is None
    text = pooled_report(cells, runs, "topk(k=2)")
    line = next(l for l in text.splitlines() if l.startswith("| hash |"))
    assert f"{np.mean(HASH):.4f} ± {loss.half_width:.4f}" in line and "(resolved)" in line
    assert "| topk(k=2) |" in text and "baseline" in text
    # Every metric against the baseline: eval loss resolved (marked), tokens/s identical at every seed (p = 1).
    differences = text.split("Every metric against topk(k=2)")[1].splitlines()
    cells_of = lambda line: line.strip("| ").split(" | ")  # noqa: E731
    header = cells_of(next(l for l in differences if l.startswith("| router |")))
    values = dict(zip(header, cells_of(next(l for l in differences if l.startswith("| hash |")))))
    assert values["Δ eval loss"] == f"{diff.estimate.mean:.4f} ± {diff.estimate.half_width:.4f} (p {diff.p_value:.2g}) *"
    assert values["Δ tokens/s"].startswith("0 ± 0 (p 1)") and "*" not in values["Δ tokens/s"]


def test_regime_check_says_when_expert_capacity_matters_and_when_it_does_not(tmp_path):
    narrow = [5.20, 5.30, 5.25, 5.22]
    matters = store(tmp_path / "a", {"topk(k=2)": TOPK, "hash": HASH, "dense-active": narrow,
                                     "dense-params": [4.92, 5.01, 4.93, 4.95]})
    (verdict,) = regime_verdicts(matters[0], pooled_rows(*matters))
    assert verdict.narrow == "dense-active" and verdict.wide == "dense-params" and verdict.capacity_matters
    assert "capacity matters in this regime" in verdict.sentence()
    flat = store(tmp_path / "b", {"topk(k=2)": TOPK, "hash": HASH, "dense-active": narrow,
                                  "dense-params": [5.21, 5.27, 5.27, 5.23]})  # within the seed noise
    (verdict,) = regime_verdicts(flat[0], pooled_rows(*flat))
    assert not verdict.capacity_matters
    text = pooled_report(*flat, "topk(k=2)")
    assert "expert capacity does not matter in this regime" in text
    assert "quality differences between routers are not evidence of better routing" in text


def test_fewer_than_three_seeds_prints_no_interval_and_says_so(tmp_path):
    two = {k: v[:2] for k, v in {"topk(k=2)": TOPK, "hash": HASH, "dense-active": TOPK, "dense-params": HASH}.items()}
    cells, runs = store(tmp_path, two)
    text = pooled_report(cells, runs, "topk(k=2)")
    line = next(l for l in text.splitlines() if l.startswith("| hash |"))
    assert "2 (no CI: < 3 seeds)" in line and "±" not in line
    assert "too few for an interval" in text


def test_latex_and_html_exports_parse(tmp_path):
    cells, runs = store(tmp_path, {"topk(k=2)": TOPK, "hash": HASH, "dense-active": TOPK, "dense-params": HASH})
    html = pooled_report(cells, runs, "topk(k=2)", "html")
    (frame,) = pd.read_html(io.StringIO(html))
    assert list(frame["router"]) == ["topk(k=2)", "hash", "dense-active", "dense-params"]
    assert frame.loc[1, "seeds"] == 4
    latex = pooled_report(cells, runs, "topk(k=2)", "latex")
    assert latex.startswith(r"\begin{tabular}") and latex.rstrip().endswith(r"\end{tabular}")
    assert latex.count(r"\toprule") == latex.count(r"\midrule") == latex.count(r"\bottomrule") == 1
    body = latex.split(r"\midrule")[1].split(r"\bottomrule")[0].strip().splitlines()
    header = latex.split(r"\toprule")[1].split(r"\midrule")[0].strip()
    columns = header.count(" & ") + 1
    assert len(body) == 4 and all(re.sub(r"\\&", "", row).count(" & ") == columns - 1 for row in body)
    assert r"$\pm$" in latex and "±" not in latex


def test_two_level_bootstrap_pairs_seeds_and_sequences():
    from moe_eval.bootstrap import two_level_difference

    rng = np.random.default_rng(0)
    base = {s: rng.normal(5.0, 0.5, 200) for s in range(3)}  # sequence-to-sequence spread 0.5 nats
    shifted = {s: base[s] + 0.1 + rng.normal(0, 0.05, 200) + 0.02 * s for s in range(3)}
    mean, low, high, p = two_level_difference(shifted, base, num_resamples=4000)
    diffs = np.stack([shifted[s] - base[s] for s in range(3)])
    assert mean == pytest.approx(diffs.mean()) and low < mean < high and p < 0.01
    # Paired: the 0.5-nat spread the two systems share cancels; unpaired it would swamp a 0.1-nat difference.
    assert high - low < 0.1
    # One seed: the sequences-only paired bootstrap, which scipy's percentile bootstrap of the mean difference matches.
    one = two_level_difference({0: shifted[0]}, {0: base[0]}, num_resamples=4000)
    ref = stats.bootstrap((shifted[0] - base[0],), np.mean, n_resamples=4000, method="percentile",
                          random_state=np.random.default_rng(1)).confidence_interval
    assert one[1] == pytest.approx(ref.low, abs=0.004) and one[2] == pytest.approx(ref.high, abs=0.004)
    same = two_level_difference(base, base)
    assert same[:3] == (0.0, 0.0, 0.0) and same[3] == 1.0
    assert two_level_difference({0: base[0]}, {1: base[1]}) is None  # no seed in common
    far = {s: base[s] + 1.0 for s in range(3)}  # no resample crosses zero: p is its resolution, never 0
    assert two_level_difference(far, base, num_resamples=999)[3] == pytest.approx(2 / 1000)


def test_the_pooled_table_shows_the_bootstrap_interval_from_sequence_losses(tmp_path):
    narrow = [5.20, 5.30, 5.25, 5.22]
    cells, runs = store(tmp_path, {"topk(k=2)": TOPK, "hash": HASH, "dense-active": narrow,
                                   "dense-params": [4.92, 5.01, 4.93, 4.95]})
    rng = np.random.default_rng(0)
    shared = {s: rng.normal(5.0, 0.5, 64) for s in SEEDS}
    offset = {"topk(k=2)": 0.0, "hash": 0.1, "dense-active": 0.2, "dense-params": -0.1}
    losses = {c.id: list(shared[c.seed] + offset[c.router.display()]) for c in cells}
    rows = {r.router: r for r in pooled_rows(cells, runs, "topk(k=2)", losses)}
    mean, low, high, p = rows["hash"].vs_baseline_bootstrap
    assert mean == pytest.approx(0.1) and low == pytest.approx(0.1) and high == pytest.approx(0.1) and p < 0.002
    text = pooled_report(cells, runs, "topk(k=2)", rows=list(rows.values()))
    line = next(l for l in text.splitlines() if l.startswith("| hash |"))
    assert "[0.1000, 0.1000]" in line and "seeds x sequences bootstrap" in text
