"""The statistics behind a claim's verdict: paired tests over seeds, Holm's correction across a study's claims, two
one-sided tests for a claimed tie, and the minimum detectable effect when the data cannot decide.

A verdict is one of:
  supported     the deciding test rejects "no difference" in the claimed direction, after Holm's correction
  refuted       it rejects in the other direction (or, for a claimed tie, the interval lies outside the margin)
  equivalent    a claimed tie: both one-sided tests reject |difference| >= margin, after Holm's correction
  inconclusive  otherwise: the data cannot tell, and the minimum detectable effect says how far they are from it
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from scipy import optimize, stats

SUPPORTED, REFUTED, EQUIVALENT, INCONCLUSIVE = "supported", "refuted", "equivalent", "inconclusive"
ALPHA = 0.05
POWER = 0.80


def holm(p_values: list[float]) -> list[float]:
    """Holm–Bonferroni adjusted p-values (Holm 1979): the family-wise error rate stays at alpha across the claims.
    NaN entries (claims without a test) are left out of the family and stay NaN."""
    indexed = sorted((p, i) for i, p in enumerate(p_values) if not math.isnan(p))
    m = len(indexed)
    adjusted = [math.nan] * len(p_values)
    running = 0.0
    for rank, (p, i) in enumerate(indexed):
        running = max(running, min(1.0, (m - rank) * p))  # monotone: never below an earlier adjusted p
        adjusted[i] = running
    return adjusted


def paired_t(diffs: list[float]) -> tuple[float, float]:
    """(two-sided p, standard error) of the mean paired difference; p NaN below two pairs."""
    n = len(diffs)
    if n < 2:
        return math.nan, math.nan
    sd = float(np.std(diffs, ddof=1))
    if sd == 0.0:  # the same difference at every seed: no spread to test against
        return (1.0 if diffs[0] == 0 else 0.0), 0.0
    return float(stats.ttest_1samp(diffs, 0.0).pvalue), sd / math.sqrt(n)


def tost(diffs: list[float], margin: float) -> float:
    """Two one-sided tests (Schuirmann 1987) of |mean difference| < margin: the larger of the two one-sided p-values
    (H0: mean <= -margin, H0: mean >= +margin). NaN below two pairs."""
    n = len(diffs)
    if n < 2:
        return math.nan
    sd = float(np.std(diffs, ddof=1))
    mean = float(np.mean(diffs))
    if sd == 0.0:
        return 0.0 if abs(mean) < margin else 1.0
    se = sd / math.sqrt(n)
    lower = stats.t.sf((mean + margin) / se, n - 1)  # H0: mean <= -margin
    upper = stats.t.cdf((mean - margin) / se, n - 1)  # H0: mean >= +margin
    return float(max(lower, upper))


def power_paired_t(effect: float, sd: float, n: int, alpha: float = ALPHA) -> float:
    """Power of the two-sided paired t-test with n pairs against a true mean difference `effect` (noncentral t)."""
    if n < 2 or sd <= 0:
        return math.nan
    df, critical = n - 1, stats.t.ppf(1 - alpha / 2, n - 1)
    noncentrality = abs(effect) / sd * math.sqrt(n)
    power = float(stats.nct.sf(critical, df, noncentrality) + stats.nct.cdf(-critical, df, noncentrality))
    if math.isnan(power):  # scipy's noncentral t gives up far in the tail, where the power is ~1
        return 1.0 if noncentrality > critical else 0.0
    return power


def minimum_detectable_effect(sd: float, n: int, alpha: float = ALPHA, power: float = POWER) -> float:
    """The smallest true mean difference the paired t-test detects with the given power, at this seed spread."""
    if n < 2 or not sd > 0:
        return math.nan
    # Bracket: at noncentrality t_crit + 10 the power is 1 for any n >= 2.
    high = (stats.t.ppf(1 - alpha / 2, n - 1) + 10) * sd / math.sqrt(n)
    return float(optimize.brentq(lambda d: power_paired_t(d, sd, n, alpha) - power, 1e-12 * sd, high))


def seeds_to_detect(effect: float, sd: float, alpha: float = ALPHA, power: float = POWER,
                    at_most: int = 1000) -> int | None:
    """How many seeds the paired t-test needs to detect `effect` with the given power; None beyond `at_most`."""
    if not sd > 0 or effect == 0 or math.isnan(effect):
        return None
    for n in range(2, at_most + 1):
        if power_paired_t(effect, sd, n, alpha) >= power:
            return n
    return None


@dataclass(frozen=True)
class Decision:
    verdict: str
    adjusted_p: float


def decide(direction: str, mean: float, adjusted_p: float, low: float, high: float, margin: float | None = None,
           alpha: float = ALPHA) -> Decision:
    """The verdict from the deciding test's Holm-adjusted p-value. direction: less | greater (system - against below
    / above zero) | equivalent (|system - against| < margin; adjusted_p is then the TOST p)."""
    if math.isnan(adjusted_p):
        return Decision(INCONCLUSIVE, adjusted_p)
    if direction == "equivalent":
        if adjusted_p < alpha:
            return Decision(EQUIVALENT, adjusted_p)
        if low > margin or high < -margin:
            return Decision(REFUTED, adjusted_p)
        return Decision(INCONCLUSIVE, adjusted_p)
    if adjusted_p >= alpha:
        return Decision(INCONCLUSIVE, adjusted_p)
    if (mean < 0) == (direction == "less"):
        return Decision(SUPPORTED, adjusted_p)
    return Decision(REFUTED, adjusted_p)
