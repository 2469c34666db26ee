"""The claims table: each of a study's claims decided from its finished cells (moe_eval/verdicts.py).

Per claim and model x dataset: the seeds both routers finished (paired: the same seed shares initialization and
data order), the mean of system - against with its 95% interval, the paired t-test's p and (for eval/loss) the
seeds x sequences bootstrap's p side by side, the one the claim declared deciding, Holm-adjusted across every claim
row of the study, the verdict, and for an inconclusive one the minimum detectable effect at 80% power and the seeds
that would detect the observed difference. The regime check of the same model and dataset stands beside it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from mlflow.entities import Run

from moe_eval.bootstrap import t_interval, two_level_difference
from moe_eval.verdicts import (
    INCONCLUSIVE,
    Decision,
    decide,
    holm,
    minimum_detectable_effect,
    paired_t,
    seeds_to_detect,
    tost,
)
from workflows.metric_names import EVAL_LOSS
from workflows.report.pooled import PooledRow, RegimeVerdict, regime_verdicts
from workflows.report.render import render
from workflows.study.cells import Cell
from workflows.study.claims import Claim


@dataclass(frozen=True)
class ClaimRow:
    claim: Claim
    model: str
    dataset: str
    against: str
    diffs: list[float]  # system - against, per paired seed
    t_p: float
    bootstrap: tuple[float, float, float, float] | None  # (mean, low, high, p) over seeds x sequences
    deciding_p: float  # before Holm: the declared test's p (TOST's for an equivalence claim)

    @property
    def mean(self) -> float:
        return float(np.mean(self.diffs)) if self.diffs else math.nan

    def interval(self) -> tuple[float, float]:
        """95% interval of the deciding test: the bootstrap's percentiles, or the t-interval over seeds."""
        if self.claim.test == "bootstrap" and self.bootstrap is not None:
            return self.bootstrap[1], self.bootstrap[2]
        mean, half = t_interval(self.diffs) if self.diffs else (math.nan, math.nan)
        return mean - half, mean + half


@dataclass(frozen=True)
class ClaimVerdict:
    row: ClaimRow
    decision: Decision
    detectable: float  # minimum detectable effect at 80% power (paired t, observed spread); NaN where decided
    seeds_needed: int | None  # seeds for 80% power against the observed difference (inconclusive only)
    regime: str


def claim_rows(claims: list[Claim], baseline: str | None, cells: list[Cell], runs: dict[str, Run],
               sequence_losses: dict[str, list[float]]) -> list[ClaimRow]:
    """Every claim on every model x dataset it applies to (its `model` / `dataset`, else each)."""
    per_seed: dict[tuple[str, str, str, str], dict[int, float]] = {}
    sequences: dict[tuple[str, str, str], dict[int, np.ndarray]] = {}
    metrics = {c.metric for c in claims} | {c.matched_compute.metric for c in claims if c.matched_compute}
    for cell in cells:
        run = runs.get(cell.id)
        if run is None or run.info.status != "FINISHED":
            continue
        place = (cell.router.display(), cell.model.display(), cell.dataset.name)
        for metric in metrics & set(run.data.metrics):
            if math.isfinite(value := run.data.metrics[metric]):  # NaN: undefined there (a correlation with a
                per_seed.setdefault((*place, metric), {})[cell.seed] = value  # constant), so that seed pairs nothing
        if cell.id in sequence_losses:
            sequences.setdefault(place, {})[cell.seed] = np.asarray(sequence_losses[cell.id])
    places = list(dict.fromkeys((c.model.display(), c.dataset.name) for c in cells))
    rows = []
    for claim in claims:
        against = claim.compared(baseline)
        for model, dataset in places:
            if claim.model not in (None, model) or claim.dataset not in (None, dataset):
                continue
            system_values = per_seed.get((claim.system, model, dataset, claim.metric), {})
            against_place = claim.against_dataset or dataset
            if claim.against_value is not None:  # one sample: the system's seeds against the fixed value
                against_values = dict.fromkeys(system_values, claim.against_value)
            elif claim.matched_compute is not None:
                against_values = matched_values(claim, per_seed, model, dataset)
            else:
                against_values = per_seed.get((against, model, against_place, claim.metric), {})
            seeds = sorted(set(system_values) & set(against_values))
            diffs = [system_values[s] - against_values[s] for s in seeds]
            t_p, _ = paired_t(diffs)
            boot = two_level_difference(sequences.get((claim.system, model, dataset), {}),
                                        sequences.get((against, model, dataset), {})) \
                if claim.metric == EVAL_LOSS and claim.compares_two_routers_on_one_set else None
            if claim.direction == "equivalent":
                deciding = tost(diffs, claim.margin)
            elif claim.test == "bootstrap":
                deciding = boot[3] if boot else math.nan
            else:
                deciding = t_p
            shown = against if claim.against_dataset is None else f"{against} on {claim.against_dataset}"
            rows.append(ClaimRow(claim, model, dataset, shown, diffs, t_p, boot, deciding))
    return rows


def interpolate_at(compute: float, points: list[tuple[float, float]]) -> float:
    """Linear interpolation of (compute, value) points at `compute`; NaN outside their range (no extrapolation)."""
    points = sorted(points)
    for (c0, v0), (c1, v1) in zip(points, points[1:]):
        if c0 <= compute <= c1:
            return v0 if c1 == c0 else v0 + (compute - c0) / (c1 - c0) * (v1 - v0)
    return math.nan


def matched_values(claim: Claim, per_seed: dict, model: str, dataset: str) -> dict[int, float]:
    """Per seed: the references' metric interpolated at the system's compute (the same seed's cells), so the paired
    test compares the system with what the fixed-k routers would reach at its compute. Seeds where the system's
    compute lies outside the references' are left out (no extrapolation)."""
    mc = claim.matched_compute
    system_compute = per_seed.get((claim.system, model, dataset, mc.metric), {})
    out = {}
    for seed, compute in system_compute.items():
        points = [(per_seed.get((r, model, dataset, mc.metric), {}).get(seed),
                   per_seed.get((r, model, dataset, claim.metric), {}).get(seed)) for r in mc.references]
        if all(c is not None and v is not None for c, v in points):
            value = interpolate_at(compute, points)
            if not math.isnan(value):
                out[seed] = value
    return out


def verdicts(rows: list[ClaimRow], regimes: list[RegimeVerdict]) -> list[ClaimVerdict]:
    """Holm across every claim row of the study, then each row's verdict."""
    adjusted = holm([r.deciding_p for r in rows])
    regime_of = {(v.model, v.dataset): v for v in regimes}
    out = []
    for row, p in zip(rows, adjusted):
        low, high = row.interval()
        decision = decide(row.claim.direction, row.mean, p, low, high, row.claim.margin)
        sd = float(np.std(row.diffs, ddof=1)) if len(row.diffs) > 1 else math.nan
        detectable, needed = math.nan, None
        if decision.verdict == INCONCLUSIVE and len(row.diffs) > 1:
            detectable = minimum_detectable_effect(sd, len(row.diffs))
            effect = row.claim.margin if row.claim.direction == "equivalent" else row.mean
            needed = seeds_to_detect(effect, sd)
        regime = regime_of.get((row.model, row.dataset))
        regime_text = "unknown (no dense baselines of two widths)" if regime is None else \
            "capacity matters" if regime.capacity_matters else "capacity does not matter (quality is not evidence)"
        out.append(ClaimVerdict(row, decision, detectable, needed, regime_text))
    return out


def _number(x: float) -> str:
    return "—" if x is None or math.isnan(x) else f"{x:.3g}"


def claims_frame(results: list[ClaimVerdict]) -> tuple[list[str], list[dict[str, str]]]:
    headers = ["claim", "report", "compared", "seeds", "Δ (system − against) [95% CI]", "p (paired t)",
               "p (bootstrap)", "decided by", "Holm p", "verdict", "detectable at 80% / seeds needed", "regime"]
    lines = []
    for v in results:
        r, claim = v.row, v.row.claim
        low, high = r.interval()
        decided_by = "TOST" if claim.direction == "equivalent" else \
            "bootstrap" if claim.test == "bootstrap" else "paired t"
        target = f"±{claim.margin:g}" if claim.direction == "equivalent" else claim.direction
        lines.append({
            "claim": claim.name, "report": claim.report or "—",
            "compared": f"{claim.system} vs {r.against} on {claim.metric} ({target}); {r.model} / {r.dataset}",
            "seeds": str(len(r.diffs)),
            "Δ (system − against) [95% CI]": f"{_number(r.mean)} [{_number(low)}, {_number(high)}]",
            "p (paired t)": _number(r.t_p), "p (bootstrap)": _number(r.bootstrap[3]) if r.bootstrap else "—",
            "decided by": decided_by, "Holm p": _number(v.decision.adjusted_p),
            "verdict": v.decision.verdict,
            "detectable at 80% / seeds needed": "—" if math.isnan(v.detectable) else
            f"{_number(v.detectable)} / {v.seeds_needed if v.seeds_needed else '> 1000'}",
            "regime": v.regime,
        })
    return headers, lines


def with_replication(headers: list[str], lines: list[dict[str, str]], discovery: list[ClaimVerdict],
                     replication: list[ClaimVerdict]) -> tuple[list[str], list[dict[str, str]]]:
    """The replication seeds' result beside each claim row, and whether the verdict stands: the same decided
    verdict (supported, refuted or equivalent) on both seed sets."""
    added = ["replication seeds", "replication Δ [95% CI]", "replication verdict", "stands"]
    for line, first, again in zip(lines, discovery, replication):
        if not again.row.diffs:  # the replication seeds have not run (or not finished): nothing is decided yet
            line.update({"replication seeds": "0", "replication Δ [95% CI]": "—", "replication verdict": "not run",
                         "stands": "—"})
            continue
        low, high = again.row.interval()
        line.update({"replication seeds": str(len(again.row.diffs)),
                     "replication Δ [95% CI]": f"{_number(again.row.mean)} [{_number(low)}, {_number(high)}]",
                     "replication verdict": again.decision.verdict,
                     "stands": "yes" if first.decision.verdict == again.decision.verdict != INCONCLUSIVE else "no"})
    return headers[:10] + added + headers[10:], lines


def claims_report(claims: list[Claim], baseline: str | None, cells: list[Cell], runs: dict[str, Run],
                  pooled: list[PooledRow], sequence_losses: dict[str, list[float]], fmt: str = "md",
                  replication: tuple[list[Cell], list[PooledRow]] | None = None) -> str:
    """replication: the same study's cells on other seeds (and their pooled rows), decided as a family of its own."""
    results = verdicts(claim_rows(claims, baseline, cells, runs, sequence_losses), regime_verdicts(cells, pooled))
    headers, lines = claims_frame(results)
    if replication is not None:
        again_cells, again_pooled = replication
        again = verdicts(claim_rows(claims, baseline, again_cells, runs, sequence_losses),
                         regime_verdicts(again_cells, again_pooled))
        headers, lines = with_replication(headers, lines, results, again)
    table = render(headers, lines, fmt)
    if fmt != "md":
        return table
    return table + (
        "\n- Verdicts: supported / refuted when the deciding test rejects no difference (in the claimed direction / "
        "the other), after Holm's correction across this study's claims; equivalent when two one-sided tests place "
        "the difference inside the margin; inconclusive otherwise, with the smallest difference the seeds could "
        "detect at 80% power and the seeds that would detect the observed one.\n")
