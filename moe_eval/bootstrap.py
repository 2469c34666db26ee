"""Bootstrap confidence intervals and paired-bootstrap significance over documents (Efron & Tibshirani 1993;
Koehn 2004 for the paired test of two systems on the same test set)."""
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


def paired_p_value(system: ScoreSheet, baseline: ScoreSheet, metric: str, rows_RN: np.ndarray) -> float:
    """Two-sided: how often a resample's difference falls on the other side of zero from the observed one, doubled
    (Koehn 2004)."""
    observed = system.value(metric) - baseline.value(metric)
    diffs = np.array([system.value(metric, rows) - baseline.value(metric, rows) for rows in rows_RN])
    if observed == 0:
        return 1.0
    opposite = np.mean(diffs <= 0) if observed > 0 else np.mean(diffs >= 0)
    return float(min(1.0, 2 * opposite))


def t_interval(values: list[float], level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of a Student-t interval across seeds (half-width NaN for a single seed)."""
    n = len(values)
    mean = float(np.mean(values))
    if n < 2:
        return mean, math.nan
    return mean, float(stats.t.ppf((1 + level) / 2, n - 1) * np.std(values, ddof=1) / math.sqrt(n))
