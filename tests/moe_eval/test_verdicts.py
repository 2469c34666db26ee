"""The statistics behind claim verdicts, against scipy, a textbook example and simulation."""
from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from moe_eval.verdicts import (
    EQUIVALENT,
    INCONCLUSIVE,
    REFUTED,
    SUPPORTED,
    decide,
    holm,
    minimum_detectable_effect,
    paired_t,
    power_paired_t,
    seeds_to_detect,
    tost,
)


def test_holm_adjusts_the_smallest_p_by_the_family_size_and_stays_monotone():
    # sorted: 0.005 x4 = 0.02, 0.01 x3 = 0.03, 0.03 x2 = 0.06, 0.04 x1 = 0.04 -> raised to 0.06 (monotone)
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    assert holm([0.2]) == [0.2]  # a family of one: unchanged
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    adjusted = holm([0.01, math.nan, 0.02])
    assert math.isnan(adjusted[1]) and adjusted[0] == pytest.approx(0.02) and adjusted[2] == pytest.approx(0.02)
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = rng.uniform(0, 1, rng.integers(1, 8)).tolist()
        a = holm(p)
        assert all(x >= y for x, y in zip(a, p))  # never below the raw p
        order = np.argsort(p)
        assert all(a[i] <= a[j] for i, j in zip(order, order[1:]))  # same order as the raw p


def test_paired_t_is_scipys_paired_test():
    rng = np.random.default_rng(1)
    a, b = rng.normal(0, 1, 6), rng.normal(0.5, 1, 6)
    p, se = paired_t(list(a - b))
    assert p == pytest.approx(stats.ttest_rel(a, b).pvalue)
    assert se == pytest.approx(stats.sem(a - b))


def test_tost_is_the_larger_of_scipys_two_one_sided_tests():
    rng = np.random.default_rng(2)
    for _ in range(20):
        diffs = rng.normal(rng.uniform(-0.3, 0.3), 0.2, 5)
        margin = 0.25
        lower = stats.ttest_1samp(diffs, -margin, alternative="greater").pvalue
        upper = stats.ttest_1samp(diffs, margin, alternative="less").pvalue
        assert tost(list(diffs), margin) == pytest.approx(max(lower, upper))


def test_the_minimum_detectable_effect_is_detected_80_percent_of_the_time_in_simulation():
    sd, n = 0.3, 5
    effect = minimum_detectable_effect(sd, n)
    assert power_paired_t(effect, sd, n) == pytest.approx(0.80, abs=1e-6)
    rng = np.random.default_rng(3)
    draws = rng.normal(effect, sd, (20_000, n))
    rejected = stats.ttest_1samp(draws, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.80, abs=0.015)
    assert minimum_detectable_effect(sd, 20) < effect  # more seeds detect less


def test_seeds_to_detect_is_the_first_seed_count_with_80_percent_power():
    n = seeds_to_detect(0.1, 0.15)
    assert power_paired_t(0.1, 0.15, n) >= 0.8 > power_paired_t(0.1, 0.15, n - 1)
    assert seeds_to_detect(0.0, 0.1) is None


@pytest.mark.parametrize("direction,mean,p,interval,margin,verdict", [
    ("less", -0.1, 0.01, (-0.15, -0.05), None, SUPPORTED),
    ("less", 0.1, 0.01, (0.05, 0.15), None, REFUTED),
    ("greater", 0.1, 0.2, (-0.05, 0.25), None, INCONCLUSIVE),  # not rejected: never a tie
    ("equivalent", 0.01, 0.01, (-0.02, 0.04), 0.05, EQUIVALENT),
    ("equivalent", 0.2, 0.9, (0.1, 0.3), 0.05, REFUTED),  # the interval lies outside the margin
    ("equivalent", 0.02, 0.3, (-0.08, 0.12), 0.05, INCONCLUSIVE),
    ("less", -0.1, math.nan, (math.nan, math.nan), None, INCONCLUSIVE),  # too few seeds
])
def test_decide(direction, mean, p, interval, margin, verdict):
    assert decide(direction, mean, p, *interval, margin).verdict == verdict
