"""A study's hypotheses (`claims:`), each decided by `moelab aggregate` from the finished cells (workflows/report/
claims.py). A claim names what it compares and how, so its verdict is computed, never typed:

    claims:
      - name: top-2 reaches a lower validation loss than hash
        report: "001"
        metric: eval/loss
        system: top2
        against: hash            # default: the study's baseline
        direction: less          # less | greater (system - against), or equivalent (within ±margin)
        test: bootstrap          # paired_t (over seeds; the default) or bootstrap (seeds x sequences, eval/loss)

A claim about one router alone compares it with a fixed value (a one-sample t-test over seeds):

      - name: top-p gives harder examples more experts
        metric: eval/moe/difficulty_entropy_corr
        system: top_p(max_k=4,p=0.4)
        against_value: 0
        direction: greater
"""
from __future__ import annotations

from typing import Literal

from pydantic import PositiveFloat, model_validator

from moe_models.options import StrictOptions
from workflows.metric_names import (
    EVAL_LOSS,
    EVAL_MOE,
    EVAL_MOE_DIFFICULTY_CORR,
    EVAL_MOE_DIFFICULTY_ENTROPY_CORR,
    EVAL_MOE_EXPERTS_PER_TOKEN,
    EVAL_MOE_EXPERTS_PER_TOKEN_STD,
    EVAL_MOE_MEAN_TOPK_PROB,
    EVAL_MOE_ROUTER_ENTROPY_NORM,
    GLOSSARY,
)

# Metrics whose value a router fixes by construction: a claim on them is not a finding.
_FIXED_BY_K = (EVAL_MOE_EXPERTS_PER_TOKEN, EVAL_MOE_EXPERTS_PER_TOKEN_STD, EVAL_MOE_DIFFICULTY_CORR,
               EVAL_MOE_DIFFICULTY_ENTROPY_CORR)
_FIXED_BY_TABLE = (EVAL_MOE_ROUTER_ENTROPY_NORM, f"{EVAL_MOE}/router_entropy", EVAL_MOE_MEAN_TOPK_PROB)


class MatchedCompute(StrictOptions):
    """Compare at equal compute: the references' metric, interpolated per seed (linearly in `metric`, between the
    two references that bracket the system's value) at the system's compute, stands in for `against`."""
    metric: str  # the compute measure, e.g. eval/moe/experts_per_token or summary/train_gflops_per_token
    references: list[str]  # fixed-k router labels spanning the system's compute, e.g. [top2, top3]


class Claim(StrictOptions):
    name: str  # the claim in words, as the table shows it
    report: str | None = None  # the report it comes from (../shared: 000-003)
    metric: str  # a metric every compared cell logs (docs: the metric glossary)
    system: str  # a router label of the study
    against: str | None = None  # a router label; None: the study's baseline
    # Instead of a router: a fixed value of the metric (e.g. a correlation's 0), tested over seeds with one sample.
    against_value: float | None = None
    direction: Literal["less", "greater", "equivalent"]  # the sign of system - against, or a tie within ±margin
    margin: PositiveFloat | None = None  # equivalent: the tie's margin, in the metric's units
    test: Literal["paired_t", "bootstrap"] = "paired_t"  # the one test that decides; the other is shown beside it
    matched_compute: MatchedCompute | None = None  # instead of `against`: the references at the system's compute
    model: str | None = None  # which model / dataset, where the study has several (default: each, one row apiece)
    dataset: str | None = None  # likewise for the dataset
    # Compare datasets instead of routers: `system` (or `against`) on `dataset` against itself on this one.
    against_dataset: str | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "Claim":
        if (self.direction == "equivalent") != (self.margin is not None):
            raise ValueError("margin: set it for direction: equivalent (the tie's margin), and only then")
        if self.test == "bootstrap" and self.metric != EVAL_LOSS:
            raise ValueError(f"test: bootstrap resamples the per-sequence eval losses; it decides {EVAL_LOSS} only")
        if self.test == "bootstrap" and self.direction == "equivalent":
            raise ValueError("test: an equivalence claim is decided by two one-sided paired t-tests (paired_t)")
        if self.against_value is not None:
            if self.against is not None or self.matched_compute is not None or self.against_dataset is not None:
                raise ValueError("against_value: the system is compared with this value alone; leave `against`, "
                                 "`matched_compute` and `against_dataset` out")
            if self.test != "paired_t":
                raise ValueError("test: a claim against a value is decided over seeds (paired_t, one sample)")
        if self.against_dataset is not None and (self.dataset is None or self.matched_compute is not None):
            raise ValueError("against_dataset: set `dataset` too (the two datasets compared), without matched_compute")
        if self.against_dataset is not None and self.test != "paired_t":
            raise ValueError("test: two datasets have different evaluation sets; compare them over seeds (paired_t)")
        if self.matched_compute is not None:
            if self.against is not None:
                raise ValueError("matched_compute: compares with the references interpolated at the system's "
                                 "compute; leave `against` out")
            if self.test != "paired_t":
                raise ValueError("test: a matched-compute claim is decided over seeds (paired_t)")
            if len(self.matched_compute.references) < 2:
                raise ValueError("matched_compute.references: at least two routers, to interpolate between")
            if not known_metric(self.matched_compute.metric):
                raise ValueError(f"matched_compute.metric: {self.matched_compute.metric!r} is not a metric moelab logs")
        if not known_metric(self.metric):
            raise ValueError(f"metric: {self.metric!r} is not a metric moelab logs (the glossary's names, "
                             f"{EVAL_MOE}/<routing measure>, test/<summary metric>)")
        return self

    @property
    def compares_two_routers_on_one_set(self) -> bool:
        """Both sides are cells evaluated on the same fixed sequences: the seeds x sequences bootstrap can pair them."""
        return self.matched_compute is None and self.against_dataset is None and self.against_value is None

    def compared(self, baseline: str | None) -> str | None:
        if self.against_value is not None:
            return f"{self.against_value:g}"
        if self.against_dataset is not None:
            return self.against or self.system
        if self.matched_compute is not None:
            return f"{' / '.join(self.matched_compute.references)} at equal {self.matched_compute.metric}"
        return self.against or baseline


def known_metric(metric: str) -> bool:
    """A glossary metric, a routing measure (eval/moe/..., per block too) or a summary score (test/rouge1, ...)."""
    from moe_eval.score_names import BLEU, MEAN_METRICS

    return metric in GLOSSARY or metric.startswith(EVAL_MOE + "/") or \
        metric.removeprefix("test/") in (BLEU, *MEAN_METRICS) and metric.startswith("test/")


def fixed_by_construction(router_name: str, router_options, metric: str) -> str | None:
    """Why a router's value of `metric` is fixed by its construction, or None."""
    from moe_models.spec import DENSE

    if router_name == DENSE and metric.startswith(EVAL_MOE):
        return "a dense model has no routing"
    if router_options is None:
        return None
    if router_options.fixed_k and metric in _FIXED_BY_K:
        return "every token gets the same number of experts"
    if not router_options.learned and metric in _FIXED_BY_TABLE:
        return "it routes by a fixed table, not a learned score"
    return None
