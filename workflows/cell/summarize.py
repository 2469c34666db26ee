"""After a summarization cell trains: decode the test documents, score them, and log metrics with 95% bootstrap
confidence intervals plus a per-document predictions artifact that the aggregation reads back from MLflow.

Every rank decodes the same documents: with expert parallelism each MoE forward is a collective, so ranks must run
the same number of decoder steps; rank 0 alone scores and logs.
"""
from __future__ import annotations

import json

from moe_data.prepared_pairs import PreparedPairs
from moe_eval.bootstrap import percentile_ci, resamples
from moe_eval.score_sheet import ScoreSheet, score_summaries
from moe_models.generation import generate
from workflows.study.sections import SummarizationConfig
from workflows.tracking import BLEU_SIGNATURE_TAG, PREDICTIONS_ARTIFACT

TEST_SPLIT = "test"


def test_documents(data: PreparedPairs, cfg: SummarizationConfig) -> int:
    return min(cfg.eval_documents, data.num_pairs(TEST_SPLIT))


def generate_summaries(model, data: PreparedPairs, cfg: SummarizationConfig, source_len: int) -> list[str]:
    tokenizer = data.tokenizer()
    n, settings, texts = test_documents(data, cfg), cfg.generation_settings(), []
    device = next(model.parameters()).device
    model.eval()
    for start in range(0, n, cfg.eval_batch_size):
        src, valid = data.sources(TEST_SPLIT, list(range(start, min(n, start + cfg.eval_batch_size))), source_len)
        texts += tokenizer.decode_batch(generate(model, src.to(device), valid.to(device), settings, data.eos_id))
    model.train()
    return [t.strip() for t in texts]


def summary_metrics(sheet: ScoreSheet, cfg: SummarizationConfig) -> dict[str, float]:
    """test/<metric> and its percentile-bootstrap 95% CI over documents."""
    rows = resamples(sheet.num_documents, cfg.bootstrap_resamples)
    metrics = {}
    for metric in sheet.metrics:
        low, high = percentile_ci(sheet, metric, rows)
        metrics.update({f"test/{metric}": sheet.value(metric), f"test/{metric}_ci_low": low,
                        f"test/{metric}_ci_high": high})
    return metrics


def evaluate_summaries(predictions: list[str], data: PreparedPairs, cfg: SummarizationConfig
                       ) -> tuple[dict[str, float], ScoreSheet, list[dict]]:
    """(metrics, score sheet, predictions artifact rows)."""
    n = len(predictions)
    references, documents = data.summaries[TEST_SPLIT][:n], data.documents[TEST_SPLIT][:n]
    sheet = score_summaries(predictions, references, documents, cfg.bertscore_model)
    rows = [{"pair_id": data.pair_ids[TEST_SPLIT][i], "prediction": predictions[i], **scores}
            for i, scores in enumerate(sheet.to_rows())]
    return summary_metrics(sheet, cfg), sheet, rows


def score_and_log(tracker, run_id: str, predictions: list[str], data: PreparedPairs,
                  cfg: SummarizationConfig) -> dict[str, float]:
    """Score the test predictions; log them per document with the metrics' provenance (sacreBLEU signature,
    BERTScore model) on the run. Returns the metrics (the caller logs them with its other metrics)."""
    metrics, sheet, rows = evaluate_summaries(predictions, data, cfg)
    tracker.log_text(run_id, "".join(json.dumps(row) + "\n" for row in rows), PREDICTIONS_ARTIFACT)
    tracker.set_tags(run_id, {BLEU_SIGNATURE_TAG: sheet.bleu_signature, **sheet.meta})
    return metrics
