"""The pooled report of a summarization study on hand-made MLflow runs (a real SQLite store) with known per-document
scores: ROUGE pooled across seeds with the same intervals and paired test as every study (checked against scipy),
the per-document table and its documents x seeds bootstrap against the baseline, and `distinct`."""
from __future__ import annotations

import json

import numpy as np
import pytest
from mlflow.tracking import MlflowClient
from scipy import stats

from moe_eval.score_sheet import ScoreSheet
from workflows.report.exports import pooled_report
from workflows.report.pooled import document_difference_frame, document_metrics_frame, pooled_rows
from workflows.report.summarization import load_systems
from workflows.study.cells import expand
from workflows.study.loading import parse_study
from workflows.tracking import PREDICTIONS_ARTIFACT, Tracker

SEEDS = [0, 1, 2]
DOCUMENTS = 40
STUDY = {
    "name": "pooled_sum", "seeds": SEEDS, "baseline": "top2",
    "routers": [{"name": "topk", "k": 2, "label": "top2"}, {"name": "hash"}],
    "models": [{"name": "seq2seq", "num_experts": 4}],
    "datasets": [{"name": "builtin:docstrings"}],
    "summarization": {"baseline": "top2", "bootstrap_resamples": 400},
}
SHIFT = {"top2": 0.0, "hash": 0.05}  # hash's ROUGE-1 is the baseline's + 0.05 on every document


def rouge1_of(router: str, seed: int) -> np.ndarray:
    base = np.random.default_rng(seed).uniform(0.2, 0.4, DOCUMENTS)
    return base + SHIFT[router] + 0.01 * seed


def predictions(router: str, seed: int) -> list[dict]:
    r1 = rouge1_of(router, seed)
    # hash writes one summary for every document (distinct = 1/40); top-2 a different one for each.
    texts = ["the same summary"] * DOCUMENTS if router == "hash" else [f"summary {i}" for i in range(DOCUMENTS)]
    return [{"pair_id": f"d{i}", "prediction": texts[i], "rouge1": r1[i], "rouge2": r1[i] / 2, "rougeL": r1[i],
             "rougeLsum": r1[i], "bertscore_f1": r1[i], "coverage": 0.5, "density": 1.0, "compression": 4.0,
             "bigram_overlap": 0.2, "summary_words": 8.0, "bleu_stats": [8, 4, 2, 1, 8, 7, 6, 5, 8, 10]}
            for i in range(DOCUMENTS)]


@pytest.fixture()
def stored(tmp_path):
    study = parse_study(STUDY)
    cells = expand(study)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    client = MlflowClient(uri)
    experiment = client.create_experiment(study.name, artifact_location=(tmp_path / "art").as_uri())
    runs = {}
    for cell in cells:
        run_id = client.create_run(experiment).info.run_id
        rows = predictions(cell.router.display(), cell.seed)
        client.log_metric(run_id, "test/rouge1", float(np.mean([r["rouge1"] for r in rows])))
        client.log_metric(run_id, "eval/loss", 3.0 + SHIFT[cell.router.display()] + 0.1 * cell.seed)
        client.log_text(run_id, "".join(json.dumps(r) + "\n" for r in rows), PREDICTIONS_ARTIFACT)
        client.set_terminated(run_id, "FINISHED")
        runs[cell.id] = client.get_run(run_id)
    return study, cells, runs, Tracker(uri)


def test_rouge_is_pooled_across_seeds_like_every_metric(stored):
    _, cells, runs, _ = stored
    rows = {r.router: r for r in pooled_rows(cells, runs, "top2")}
    per_seed = [100 * rouge1_of("hash", s).mean() for s in SEEDS]
    rouge = rows["hash"].values["ROUGE-1"]
    assert rouge.mean == pytest.approx(np.mean(per_seed))
    assert rouge.half_width == pytest.approx(stats.t.ppf(0.975, 2) * np.std(per_seed, ddof=1) / np.sqrt(3))
    text = pooled_report(cells, runs, "top2")
    differences = text.split("Every metric against top2")[1]
    hash_line = next(line for line in differences.splitlines() if line.startswith("| hash |"))
    rouge_delta = hash_line.strip("| ").split(" | ")[-1]  # the last column: Δ ROUGE-1
    assert rouge_delta.startswith("5.00 ± 0.00 (p ") and rouge_delta.endswith(" *")  # +5 points at every seed


def test_document_table_and_bootstrap_against_the_baseline(stored):
    study, cells, runs, tracker = stored
    ((_, systems),) = load_systems(study, cells, runs, tracker).items()
    headers, rows = document_metrics_frame(systems)
    by_router = {r["router"]: r for r in rows}
    assert by_router["hash"]["seeds"] == "3"
    sheets = [ScoreSheet.from_rows(predictions("hash", s)) for s in SEEDS]
    values = [100 * sheet.value("rouge1") for sheet in sheets]
    half = stats.t.ppf(0.975, 2) * np.std(values, ddof=1) / np.sqrt(3)
    assert by_router["hash"]["ROUGE-1"] == f"{np.mean(values):,.2f} ± {half:,.2f}"
    assert by_router["hash"]["distinct"] == "0.03 ± 0.00" and by_router["top2"]["distinct"] == "1.00 ± 0.00"
    diff_headers, diffs = document_difference_frame(systems, "top2", 400)
    (hash_diff,) = diffs
    assert hash_diff["router"] == "hash" and hash_diff["ΔROUGE-1 (p)"] == "+5.00 (0.005)"  # 2 / 401: its resolution
    assert hash_diff["ΔBLEU (p)"] == "+0.00 (1.000)"  # identical n-gram statistics: no difference to test
    assert document_difference_frame(systems, "no-such-router", 10) is None
