"""Extractiveness of summaries against their documents, as a local `evaluate` module.

- bigram_overlap: fraction of the summary's word bigrams that occur in the document;
- coverage, density, compression: Newsroom (Grusky et al. 2018, section 4.1), from the greedy extractive fragments
  F(A, S): coverage = sum|f| / |S|, density = sum|f|^2 / |S|, compression = |A| / |S| (in words).
Words are lower-cased \\w+ runs (Newsroom used spaCy tokens).
"""
import re

import datasets
import evaluate

_WORD = re.compile(r"\w+")


def words(text: str) -> list[str]:
    return _WORD.findall(text.lower())


def fragments(article: list[str], summary: list[str]) -> list[list[str]]:
    """Newsroom's greedy matching: for each summary position, the longest shared run starting there."""
    found, i = [], 0
    while i < len(summary):
        best, j = [], 0
        while j < len(article):
            if summary[i] == article[j]:
                i2, j2 = i, j
                while i2 < len(summary) and j2 < len(article) and summary[i2] == article[j2]:
                    i2, j2 = i2 + 1, j2 + 1
                if len(best) < i2 - i:
                    best = summary[i:i2]
                j = j2
            else:
                j += 1
        i += max(len(best), 1)
        if best:
            found.append(best)
    return found


def bigram_overlap(article: list[str], summary: list[str]) -> float:
    grams = list(zip(summary, summary[1:]))
    if not grams:
        return 0.0
    source = set(zip(article, article[1:]))
    return sum(g in source for g in grams) / len(grams)


def scores(document: str, summary: str) -> dict[str, float]:
    article, summ = words(document), words(summary)
    n = max(len(summ), 1)  # an empty summary: coverage/density 0, compression = article length
    frags = fragments(article, summ)
    return {"coverage": sum(len(f) for f in frags) / n, "density": sum(len(f) ** 2 for f in frags) / n,
            "compression": len(article) / n, "bigram_overlap": bigram_overlap(article, summ)}


class Extractiveness(evaluate.Metric):
    def _info(self):
        return evaluate.MetricInfo(
            description="Newsroom coverage/density/compression and summary bigrams found in the source.",
            citation="Grusky et al., 2018. Newsroom.", inputs_description="predictions: summaries; references: documents",
            features=datasets.Features({"predictions": datasets.Value("string"),
                                        "references": datasets.Value("string")}))

    def _compute(self, predictions, references):
        per_example = [scores(doc, summ) for summ, doc in zip(predictions, references)]
        return {key: [s[key] for s in per_example] for key in ("coverage", "density", "compression", "bigram_overlap")}
