"""The comparison a study's question needs: seeds pooled per router x model x dataset, with intervals, the difference
to the study's baseline router tested across seeds, compute next to quality, and the regime check.

- Each metric column: mean and 95% Student-t half-width across seeds; with fewer than 3 seeds the interval is not
  printed (two points give an interval too wide to mean anything) and the row says so.
- Against `baseline:` (a router label), per model and dataset: the mean paired difference over the seeds both have
  (cells with the same seed share initialization and data order), its t-interval, and a two-sided paired t-test.
- Regime check: when a study holds dense baselines of two widths (equal active FLOPs and equal parameters), does the
  wider one beat the narrower beyond the interval? If not, expert capacity does not matter at this size, and quality
  differences between routers are not evidence of better routing (the report says so in words).
- Summarization adds what per-document scores allow: the same per-seed pooling of every document metric (ROUGE,
  BLEU, BERTScore, extractiveness, `distinct`), and against the baseline the documents x seeds bootstrap.
"""
from __future__ import annotations

import math
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from mlflow.entities import Run
from scipy import stats

from moe_eval.bootstrap import MIN_SEEDS_FOR_INTERVAL, paired_p_value, t_interval, two_level_difference
from moe_eval.score_sheet import BLEU, ScoreSheet
from moe_models.spec import DENSE
from workflows.metric_names import EVAL_LOSS, SUMMARY_TRAIN_GFLOPS_PER_TOKEN
from workflows.report.table import METRIC_COLUMNS, Column
from workflows.study.cells import Cell

QUALITY = Column("eval loss", EVAL_LOSS, 4)  # what the baseline test and the regime check compare (lower is better)
COMPUTE_COLUMNS = (Column("train MFLOP/token", SUMMARY_TRAIN_GFLOPS_PER_TOKEN, 2, 1e3),)


@dataclass(frozen=True)
class Estimate:
    mean: float
    half_width: float  # NaN: not enough seeds for an interval
    n: int

    def text(self, digits: int) -> str:
        if math.isnan(self.mean):
            return "—"
        if self.n < MIN_SEEDS_FOR_INTERVAL or math.isnan(self.half_width):
            return f"{self.mean:,.{digits}f}"
        return f"{self.mean:,.{digits}f} ± {self.half_width:,.{digits}f}"


@dataclass(frozen=True)
class Difference:
    """system - baseline over paired seeds."""

    estimate: Estimate
    p_value: float  # NaN below two pairs

    @property
    def resolved(self) -> bool:
        """The interval excludes zero (only with enough seeds to have one)."""
        e = self.estimate
        return e.n >= MIN_SEEDS_FOR_INTERVAL and not math.isnan(e.half_width) and abs(e.mean) > e.half_width


@dataclass
class PooledRow:
    router: str
    model: str
    dataset: str
    seeds: list[int]
    values: dict[str, Estimate]  # column header -> estimate
    vs_baseline: Difference | None = None
    per_seed: dict[str, dict[int, float]] = field(default_factory=dict)  # metric -> seed -> value
    sequence_losses: dict[int, list[float]] = field(default_factory=dict)  # seed -> final eval loss per sequence
    # system - baseline eval loss, two-level bootstrap (seeds, then sequences): (mean, low, high, p)
    vs_baseline_bootstrap: tuple[float, float, float, float] | None = None


def estimate(values: list[float]) -> Estimate:
    if not values:
        return Estimate(math.nan, math.nan, 0)
    mean, half = t_interval(values)
    return Estimate(mean, half, len(values))


def _seeds_text(n: int) -> str:
    return f"{n}" + ("" if n >= MIN_SEEDS_FOR_INTERVAL else f" (no CI: < {MIN_SEEDS_FOR_INTERVAL} seeds)")


def paired_difference(system: dict[int, float], baseline: dict[int, float]) -> Difference | None:
    seeds = sorted(set(system) & set(baseline))
    if not seeds:
        return None
    diffs = [system[s] - baseline[s] for s in seeds]
    p = math.nan
    if len(seeds) >= 2:
        if np.ptp(diffs) == 0:  # the same difference at every seed: no spread to test against
            p = 1.0 if diffs[0] == 0 else 0.0
        else:
            p = float(stats.ttest_1samp(diffs, 0.0).pvalue)  # = scipy.stats.ttest_rel(system, baseline)
    return Difference(estimate(diffs), p)


def pooled_rows(cells: list[Cell], runs: dict[str, Run], baseline: str | None = None,
                sequence_losses: dict[str, list[float]] | None = None) -> list[PooledRow]:
    """One row per router x model x dataset, in study order, over its FINISHED cells. sequence_losses: cell id ->
    its final evaluation's loss per sequence (for the two-level bootstrap against the baseline)."""
    sequence_losses = sequence_losses or {}
    by_key: dict[tuple[str, str, str], dict[int, list[float]]] = defaultdict(dict)
    columns = (*METRIC_COLUMNS, *COMPUTE_COLUMNS)
    groups: dict[tuple[str, str, str], dict[int, dict[str, float]]] = defaultdict(dict)
    for cell in cells:
        key = (cell.router.display(), cell.model.display(), cell.dataset.name)
        groups.setdefault(key, {})
        run = runs.get(cell.id)
        if run is not None and run.info.status == "FINISHED":
            groups[key][cell.seed] = run.data.metrics
            if cell.id in sequence_losses:
                by_key[key][cell.seed] = sequence_losses[cell.id]
    rows = []
    for (router, model, dataset), by_seed in groups.items():
        per_seed = {c.metric: {s: m[c.metric] * c.scale for s, m in by_seed.items() if c.metric in m} for c in columns}
        values = {c.header: estimate(list(per_seed[c.metric].values())) for c in columns if per_seed[c.metric]}
        rows.append(PooledRow(router, model, dataset, sorted(by_seed), values, per_seed=per_seed,
                              sequence_losses=by_key.get((router, model, dataset), {})))
    if baseline is not None:
        reference = {(r.model, r.dataset): r for r in rows if r.router == baseline}
        for row in rows:
            base = reference.get((row.model, row.dataset))
            if base is not None and row is not base:
                row.vs_baseline = paired_difference(row.per_seed[QUALITY.metric], base.per_seed[QUALITY.metric])
                row.vs_baseline_bootstrap = two_level_difference(
                    {s: np.asarray(v) for s, v in row.sequence_losses.items()},
                    {s: np.asarray(v) for s, v in base.sequence_losses.items()})
    return rows


@dataclass(frozen=True)
class RegimeVerdict:
    model: str
    dataset: str
    narrow: str  # the dense baseline of equal active FLOPs
    wide: str  # the wider one (equal parameters)
    difference: Difference | None  # wide - narrow eval loss

    @property
    def capacity_matters(self) -> bool:
        return self.difference is not None and self.difference.resolved and self.difference.estimate.mean < 0

    def sentence(self) -> str:
        d = self.difference
        where = f"{self.model} / {self.dataset}"
        if d is None:
            return f"{where}: no seed has both dense baselines finished; the regime is unknown."
        shown = d.estimate.text(4)
        if d.estimate.n < MIN_SEEDS_FOR_INTERVAL:
            return (f"{where}: the wider dense model ({self.wide}) minus the narrower ({self.narrow}) is {shown} nats "
                    f"over {d.estimate.n} seed(s), too few for an interval; whether expert capacity matters here is "
                    "not established, and quality differences between routers are not evidence.")
        if self.capacity_matters:
            return (f"{where}: the wider dense model ({self.wide}) beats the narrower ({self.narrow}) by {shown} nats "
                    f"(95% CI over {d.estimate.n} seeds, p = {d.p_value:.3g}): capacity matters in this regime, so "
                    "routers can differ on quality through their experts.")
        return (f"{where}: the wider dense model ({self.wide}) does not beat the narrower ({self.narrow}) beyond the "
                f"interval ({shown} nats, {d.estimate.n} seeds): expert capacity does not matter in this regime, and "
                "quality differences between routers are not evidence of better routing.")


def regime_verdicts(cells: list[Cell], rows: list[PooledRow]) -> list[RegimeVerdict]:
    """Per model and dataset with dense baselines of two or more widths: the narrowest against the widest."""
    widths: dict[str, int] = {c.router.display(): c.router.active_experts for c in cells if c.router.name == DENSE}
    verdicts = []
    by_place: dict[tuple[str, str], list[PooledRow]] = defaultdict(list)
    for row in rows:
        if row.router in widths:
            by_place[(row.model, row.dataset)].append(row)
    for (model, dataset), dense in by_place.items():
        if len({widths[r.router] for r in dense}) < 2:
            continue
        narrow = min(dense, key=lambda r: widths[r.router])
        wide = max(dense, key=lambda r: widths[r.router])
        verdicts.append(RegimeVerdict(model, dataset, narrow.router, wide.router,
                                      paired_difference(wide.per_seed[QUALITY.metric],
                                                        narrow.per_seed[QUALITY.metric])))
    return verdicts


def difference_frame(rows: list[PooledRow], baseline: str) -> tuple[list[str], list[dict[str, Any]]]:
    """Every metric column against the baseline router: the paired difference over seeds (system - baseline), its
    interval and paired-t p, marked when the interval excludes 0. Specialization claims (purity, NMI) need these as
    much as quality does."""
    columns = [c for c in (*METRIC_COLUMNS, *COMPUTE_COLUMNS) if any(c.header in r.values for r in rows)]
    reference = {(r.model, r.dataset): r for r in rows if r.router == baseline}
    headers = ["router", "model", "dataset", *[f"Δ {c.header}" for c in columns]]
    out = []
    for row in rows:
        base = reference.get((row.model, row.dataset))
        if base is None or row is base:
            continue
        cells: dict[str, Any] = {"router": row.router, "model": row.model, "dataset": row.dataset}
        for c in columns:
            d = paired_difference(row.per_seed.get(c.metric, {}), base.per_seed.get(c.metric, {}))
            if d is None:
                cells[f"Δ {c.header}"] = "—"
                continue
            p = "" if math.isnan(d.p_value) else f" (p {d.p_value:.2g})"
            cells[f"Δ {c.header}"] = f"{d.estimate.text(c.digits)}{p}{' *' if d.resolved else ''}"
        out.append(cells)
    return headers, out


def shown_headers(rows: list[PooledRow]) -> list[str]:
    return [c.header for c in (*METRIC_COLUMNS, *COMPUTE_COLUMNS) if any(c.header in r.values for r in rows)]


def frame_rows(rows: list[PooledRow], baseline: str | None) -> tuple[list[str], list[dict[str, Any]]]:
    """(headers, text cells) of the pooled table: what every export renders."""
    digits = {c.header: c.digits for c in (*METRIC_COLUMNS, *COMPUTE_COLUMNS)}
    metric_headers = shown_headers(rows)
    headers = ["router", "model", "dataset", "seeds", *metric_headers]
    bootstrapped = any(r.vs_baseline_bootstrap for r in rows)
    if baseline is not None:
        headers += [f"Δ eval loss vs {baseline}", "p (paired t)"]
        if bootstrapped:
            headers += ["Δ 95% CI (seeds x sequences bootstrap)", "p (bootstrap)"]
    out = []
    for row in rows:
        cells: dict[str, Any] = {"router": row.router, "model": row.model, "dataset": row.dataset,
                                 "seeds": _seeds_text(len(row.seeds))}
        for header in metric_headers:
            cells[header] = row.values[header].text(digits[header]) if header in row.values else "—"
        if baseline is not None:
            delta, p_t = f"Δ eval loss vs {baseline}", "p (paired t)"
            d = row.vs_baseline
            if row.router == baseline:
                cells[delta], cells[p_t] = "baseline", ""
            elif d is None:
                cells[delta], cells[p_t] = "—", ""
            else:
                verdict = "" if d.estimate.n < MIN_SEEDS_FOR_INTERVAL else (" (resolved)" if d.resolved
                                                                            else " (within noise)")
                cells[delta] = f"{d.estimate.text(4)}{verdict}"
                cells[p_t] = "—" if math.isnan(d.p_value) else f"{d.p_value:.3g}"
            if bootstrapped:
                b = row.vs_baseline_bootstrap
                cells["Δ 95% CI (seeds x sequences bootstrap)"] = (
                    "" if row.router == baseline else "—" if b is None else f"[{b[1]:.4f}, {b[2]:.4f}]")
                cells["p (bootstrap)"] = "" if b is None else f"{b[3]:.3g}"
        out.append(cells)
    return headers, out


# Summarization: (header, metric, scale) of the per-document metrics; ROUGE and BERTScore x100, as papers report them.
DOCUMENT_METRICS = (("ROUGE-1", "rouge1", 100), ("ROUGE-2", "rouge2", 100), ("ROUGE-L", "rougeL", 100),
                    ("ROUGE-Lsum", "rougeLsum", 100), ("BLEU", BLEU, 1), ("BERTScore F1", "bertscore_f1", 100),
                    ("bigrams in source", "bigram_overlap", 1), ("coverage", "coverage", 1), ("density", "density", 1),
                    ("compression", "compression", 1), ("words", "summary_words", 1), ("repetition", "repetition", 1))
TESTED_DOCUMENT_METRICS = ("rouge1", "rouge2", "rougeL", BLEU, "bertscore_f1")


@dataclass
class SystemRuns:
    """One summarizer's finished cells (one per seed) on one model and dataset, with their per-document scores."""

    label: str
    seeds: list[int]
    sheets: list[ScoreSheet]
    predictions: list[list[str]]  # per seed, per document
    pair_ids: list[str]
    bleu_signature: str

    @property
    def distinct(self) -> list[float]:
        """Per seed, the share of different summaries among the documents: near 0 when a model ignores its input."""
        return [len(set(p)) / len(p) for p in self.predictions]


def document_metrics_frame(systems: list[SystemRuns]) -> tuple[list[str], list[dict[str, Any]]]:
    """Per system: every document metric's corpus value per seed, pooled like every other table's columns."""
    headers = ["router", "seeds", *(h for h, _, _ in DOCUMENT_METRICS), "distinct"]
    rows = []
    for s in systems:
        row: dict[str, Any] = {"router": s.label, "seeds": _seeds_text(len(s.seeds))}
        for header, metric, scale in DOCUMENT_METRICS:
            row[header] = estimate([sheet.value(metric) * scale for sheet in s.sheets]).text(2)
        row["distinct"] = estimate(s.distinct).text(2)
        rows.append(row)
    return headers, rows


def document_difference_frame(systems: list[SystemRuns], baseline: str, num_resamples: int
                              ) -> tuple[list[str], list[dict[str, Any]]] | None:
    """Against the baseline: the difference of the seeds-pooled corpus values, with the two-sided documents x seeds
    bootstrap p (moe_eval.bootstrap.paired_p_value); None when the baseline has no finished cells."""
    base = next((s for s in systems if s.label == baseline), None)
    if base is None:
        return None
    pooled_base = ScoreSheet.pooled(base.sheets)
    tested = [(h, m, scale) for h, m, scale in DOCUMENT_METRICS if m in TESTED_DOCUMENT_METRICS]
    headers = ["router", *(f"Δ{h} (p)" for h, _, _ in tested)]
    rows = []
    for s in systems:
        if s is base:
            continue
        if s.pair_ids != base.pair_ids:
            raise ValueError(f"{s.label} and {baseline} were scored on different test documents")
        pooled = ScoreSheet.pooled(s.sheets)
        row: dict[str, Any] = {"router": s.label}
        for header, metric, scale in tested:
            delta = (pooled.value(metric) - pooled_base.value(metric)) * scale
            row[f"Δ{header} (p)"] = f"{delta:+.2f} ({paired_p_value(s.sheets, base.sheets, metric, num_resamples):.3f})"
        rows.append(row)
    return headers, rows
