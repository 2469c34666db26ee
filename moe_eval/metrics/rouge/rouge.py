"""ROUGE-1/2/L/Lsum F-measures (Lin 2004) through Google's `rouge_score`, as a local `evaluate` module.

A local copy of the hub's `rouge` module's interface (which `evaluate.load("rouge")` downloads), returning per-example
scores when use_aggregator=False so callers can bootstrap confidence intervals.
"""
import datasets
import evaluate
from rouge_score import rouge_scorer, scoring

_DESCRIPTION = "ROUGE F-measures with Porter stemming by default (rouge_score)."
_KWARGS = "predictions: list of str; references: list of str; rouge_types; use_aggregator; use_stemmer"


class Rouge(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description=_DESCRIPTION, citation="Lin, 2004. ROUGE.", inputs_description=_KWARGS,
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references, rouge_types=None, use_aggregator=True, use_stemmer=True):
        rouge_types = rouge_types or ["rouge1", "rouge2", "rougeL", "rougeLsum"]
        scorer = rouge_scorer.RougeScorer(rouge_types, use_stemmer=use_stemmer)
        per_example = [scorer.score(ref, pred) for ref, pred in zip(references, predictions)]
        if use_aggregator:
            aggregator = scoring.BootstrapAggregator()
            for score in per_example:
                aggregator.add_scores(score)
            return {t: s.mid.fmeasure for t, s in aggregator.aggregate().items()}
        return {t: [score[t].fmeasure for score in per_example] for t in rouge_types}
