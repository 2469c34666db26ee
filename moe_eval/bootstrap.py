"""Bootstrap confidence intervals over documents and a two-level (documents x seeds) paired significance test
(Efron & Tibshirani 1993; Koehn 2004 for pairing two systems on the same test set)."""
from __future__ import annotations

import math

import numpy as np
from scipy import stats

from moe_eval.score_sheet import ScoreSheet


def resamples(num_documents: int, num_resamples: int, seed: int = 0) -> np.ndarray:
    """(R, N) document indices drawn with replacement; one fixed draw shared by every system keeps tests paired."""
    return np.random.default_rng(seed).integers(0, num_documents, size=(num_resamples, num_documents))


def percentile_ci(sheet: ScoreSheet, metric: str, rows_RN: np.ndarray, level: float = 0.95) -> tuple[float, float]:
    values = np.array([sheet.value(metric, rows) for rows in rows_RN])
    tail = (1 - level) / 2 * 100
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


def paired_p_value(system: list[ScoreSheet], baseline: list[ScoreSheet], metric: str, num_resamples: int,
                   seed: int = 0) -> float:
    """Two-sided bootstrap test of system - baseline over two levels: documents resampled jointly for both systems
    (paired, Koehn 2004) and each system's seeds resampled on their own, so seed-to-seed variance counts too — a
    document-only test calls a difference that one lucky seed made 'significant'. With one seed per system it is
    Koehn's paired bootstrap. p = twice the share of resampled differences on the other side of zero."""
    observed = ScoreSheet.pooled(system).value(metric) - ScoreSheet.pooled(baseline).value(metric)
    if observed == 0:
        return 1.0
    rng = np.random.default_rng(seed)
    n = system[0].num_documents
    diffs = np.empty(num_resamples)
    for r in range(num_resamples):
        rows = rng.integers(0, n, size=n)
        drawn = [ScoreSheet.pooled([sheets[i] for i in rng.integers(0, len(sheets), size=len(sheets))])
                 for sheets in (system, baseline)]
        diffs[r] = drawn[0].value(metric, rows) - drawn[1].value(metric, rows)
    return two_sided_p(diffs, observed)


def two_sided_p(draws: np.ndarray, observed: float) -> float:
    """Twice the share of resampled differences on the other side of zero, counting the observed one among them, so
    that a bootstrap p is never 0: (count + 1) / (resamples + 1) (Davison & Hinkley 1997, section 4.4)."""
    if observed == 0:
        return 1.0
    opposite = int(np.sum(draws <= 0 if observed > 0 else draws >= 0))
    return float(min(1.0, 2 * (opposite + 1) / (len(draws) + 1)))


# Intervals across seeds are shown from this many seeds on: below it a t-interval is too wide to say anything, and the
# tables say "no CI" instead. The one place the rule is written.
MIN_SEEDS_FOR_INTERVAL = 3


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of a Student-t interval across seeds (half-width NaN for a single seed)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf((1 + level) / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))


def two_level_difference(system: dict[int, np.ndarray], baseline: dict[int, np.ndarray], num_resamples: int = 2000,
                         seed: int = 0, level: float = 0.95) -> tuple[float, float, float, float] | None:
    """Mean of system - baseline over paired seeds and paired evaluation sequences (seed -> per-sequence losses on
    the same sequences), with a two-level bootstrap: seeds resampled (the same draw for both systems: a seed pairs
    initialization and data order), then sequences within them (the same rows for both: the same evaluation set).
    Returns (mean, low, high, two-sided p), or None without a seed both ran on the same sequences."""
    seeds = [s for s in sorted(set(system) & set(baseline)) if len(system[s]) == len(baseline[s]) > 0]
    if not seeds:
        return None
    lengths = {len(system[s]) for s in seeds}
    if len(lengths) > 1:
        return None
    diff_SN = np.stack([np.asarray(system[s], float) - np.asarray(baseline[s], float) for s in seeds])
    observed = float(diff_SN.mean())
    rng = np.random.default_rng(seed)
    num_seeds, num_sequences = diff_SN.shape
    draws = np.empty(num_resamples)
    for r in range(num_resamples):
        rows = diff_SN[rng.integers(0, num_seeds, size=num_seeds)]
        draws[r] = rows[:, rng.integers(0, num_sequences, size=num_sequences)].mean()
    tail = (1 - level) / 2 * 100
    low, high = float(np.percentile(draws, tail)), float(np.percentile(draws, 100 - tail))
    return observed, low, high, two_sided_p(draws, observed)
