"""Per-document scores of one set of generated summaries, and corpus values over any subset of documents.

Everything is kept per document so that confidence intervals and paired tests resample documents: mean metrics
(ROUGE, BERTScore, extractiveness) average per-document values; BLEU sums per-document n-gram statistics and lets
sacrebleu compute the corpus score from them, exactly as its own corpus_score does.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from moe_eval.metric_modules import load_metric
from moe_eval.score_names import BLEU, MEAN_METRICS  # noqa: F401  (re-exported: the sheet's columns)


@dataclass
class ScoreSheet:
    per_document: dict[str, np.ndarray]  # metric -> (N,) values
    bleu_stats: np.ndarray  # (N, 10) sacrebleu statistics per document
    bleu_signature: str = ""
    meta: dict[str, str] = field(default_factory=dict)

    @property
    def num_documents(self) -> int:
        return len(self.bleu_stats)

    @property
    def metrics(self) -> list[str]:
        return [BLEU, *self.per_document]

    def value(self, metric: str, rows: np.ndarray | None = None) -> float:
        """The corpus value of `metric` over documents `rows` (all if None; repeats allowed, as in a bootstrap)."""
        if metric == BLEU:
            from sacrebleu.metrics import BLEU as SacreBLEU

            stats = self.bleu_stats if rows is None else self.bleu_stats[rows]
            return float(SacreBLEU()._compute_score_from_stats(stats.sum(0).tolist()).score)
        values = self.per_document.get(metric)
        if values is None:  # a sheet scored before the metric existed
            return float("nan")
        return float(values.mean() if rows is None else values[rows].mean())

    def to_rows(self) -> list[dict]:
        """One JSON-ready dict per document (the predictions artifact)."""
        return [{**{m: float(v[i]) for m, v in self.per_document.items()}, "bleu_stats": self.bleu_stats[i].tolist()}
                for i in range(self.num_documents)]

    @classmethod
    def from_rows(cls, rows: list[dict], bleu_signature: str = "") -> "ScoreSheet":
        metrics = [k for k in rows[0] if k in MEAN_METRICS]
        return cls({m: np.array([r[m] for r in rows], dtype=float) for m in metrics},
                   np.array([r["bleu_stats"] for r in rows], dtype=np.int64), bleu_signature)

    @classmethod
    def pooled(cls, sheets: list["ScoreSheet"]) -> "ScoreSheet":
        """Several runs (seeds) over the same documents: per-document means, BLEU statistics summed."""
        metrics = sheets[0].per_document
        return cls({m: np.mean([s.per_document[m] for s in sheets], axis=0) for m in metrics},
                   np.sum([s.bleu_stats for s in sheets], axis=0), sheets[0].bleu_signature)


def repetition(summary: str, n: int = 2) -> float:
    """seq-rep-n (Welleck et al. 2019, "Neural Text Generation with Unlikelihood Training"): the share of a summary's
    word n-grams that repeat an earlier one, 1 - unique / all; 0 below n + 1 words. Decoding with
    no_repeat_ngram_size = n + 1 or less cannot show it, so a claim about repetition needs decoding that allows it."""
    words = summary.lower().split()
    grams = [tuple(words[i:i + n]) for i in range(len(words) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if len(grams) > 1 else 0.0


def score_summaries(predictions: list[str], references: list[str], documents: list[str],
                    bertscore_model: str) -> ScoreSheet:
    rouge = load_metric("rouge").compute(predictions=predictions, references=references, use_aggregator=False,
                                         use_stemmer=True)
    bleu = load_metric("bleu").compute(predictions=predictions, references=references)
    bert = load_metric("bertscore").compute(predictions=predictions, references=references,
                                            model_type=bertscore_model)
    extract = load_metric("extractiveness").compute(predictions=predictions, references=documents)
    per_document = {**{k: np.asarray(v, dtype=float) for k, v in rouge.items()},
                    "bertscore_f1": np.asarray(bert["f1"]), "bertscore_precision": np.asarray(bert["precision"]),
                    "bertscore_recall": np.asarray(bert["recall"]),
                    **{k: np.asarray(v, dtype=float) for k, v in extract.items()},
                    "summary_words": np.array([len(p.split()) for p in predictions], dtype=float),
                    "repetition": np.array([repetition(p) for p in predictions], dtype=float)}
    return ScoreSheet(per_document, np.asarray(bleu["stats"], dtype=np.int64), bleu["signature"],
                      {"bertscore_model": bertscore_model, "bertscore_layers": str(bert["num_layers"])})
