"""The comparison table: one row per cell, read back from MLflow (never from worker memory)."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Run

from workflows.metric_names import (
    EVAL_LOSS,
    EVAL_MOE_DIFFICULTY_CORR,
    EVAL_MOE_DIFFICULTY_ENTROPY_CORR,
    EVAL_MOE_DOMAIN_EXPERT_NMI,
    EVAL_MOE_DROP_FRACTION,
    EVAL_MOE_EXPERTS_PER_TOKEN,
    EVAL_MOE_EXPERT_FLOPS_PER_TOKEN,
    EVAL_MOE_LOAD_CV,
    EVAL_MOE_MEAN_TOPK_PROB,
    EVAL_MOE_PURITY,
    EVAL_MOE_REFERENCE_AGREEMENT,
    EVAL_MOE_ROUTER_ENTROPY_NORM,
    EVAL_MOE_UTILIZATION,
    EVAL_PERPLEXITY,
    SUMMARY_MFU,
    SUMMARY_PARAMS_TOTAL,
    SUMMARY_PARAMS_TRAINABLE,
    SUMMARY_PEAK_MEMORY_MB,
    EVAL_INFERENCE_PEAK_MB,
    EVAL_INFERENCE_MS_PER_TOKEN,
    EVAL_INFERENCE_PREFILL_TOKENS_PER_S,
    SUMMARY_ROUTER_LATENCY_SHARE,
    SUMMARY_TOKENS_PER_S,
)
from workflows.report.render import render
from workflows.study.cells import Cell
from workflows.tracking import REASON, Tracker


@dataclass(frozen=True)
class Column:
    header: str
    metric: str
    digits: int = 3
    scale: float = 1.0  # shown value = metric * scale


METRIC_COLUMNS = (
    Column("eval loss", EVAL_LOSS, 4),
    Column("perplexity", EVAL_PERPLEXITY, 2),
    Column("load CV", EVAL_MOE_LOAD_CV, 3),
    Column("experts/token", EVAL_MOE_EXPERTS_PER_TOKEN, 2),
    Column("router entropy", EVAL_MOE_ROUTER_ENTROPY_NORM, 3),
    Column("mean top-k prob", EVAL_MOE_MEAN_TOPK_PROB, 3),  # probability mass of the chosen experts
    Column("dropped", EVAL_MOE_DROP_FRACTION, 3),
    Column("utilization", EVAL_MOE_UTILIZATION, 3),
    Column("purity", EVAL_MOE_PURITY, 3),
    Column("NMI", EVAL_MOE_DOMAIN_EXPERT_NMI, 3),
    Column("ref. agreement", EVAL_MOE_REFERENCE_AGREEMENT, 3),
    Column("difficulty r", EVAL_MOE_DIFFICULTY_CORR, 3),  # per token: experts per token vs token loss
    Column("entropy r", EVAL_MOE_DIFFICULTY_ENTROPY_CORR, 3),  # per example: vs predictive entropy
    Column("expert MFLOP/token", EVAL_MOE_EXPERT_FLOPS_PER_TOKEN, 3, 1e-6),
    Column("ROUGE-1", "test/rouge1", 2, 100),
    Column("ROUGE-2", "test/rouge2", 2, 100),
    Column("ROUGE-L", "test/rougeL", 2, 100),
    Column("BLEU", "test/bleu", 2),
    Column("BERTScore F1", "test/bertscore_f1", 2, 100),
    Column("density", "test/density", 2),
    Column("params (M)", SUMMARY_PARAMS_TOTAL, 3, 1e-6),
    Column("trainable (M)", SUMMARY_PARAMS_TRAINABLE, 3, 1e-6),
    Column("tokens/s", SUMMARY_TOKENS_PER_S, 0),
    Column("MFU %", SUMMARY_MFU, 1, 100),
    Column("router share", SUMMARY_ROUTER_LATENCY_SHARE, 3),
    Column("peak MB", SUMMARY_PEAK_MEMORY_MB, 0),
    Column("inference tokens/s", EVAL_INFERENCE_PREFILL_TOKENS_PER_S, 0),
    Column("ms/token", EVAL_INFERENCE_MS_PER_TOKEN, 2),
    Column("inference peak MB", EVAL_INFERENCE_PEAK_MB, 0),
)
ID_HEADERS = ("cell", "router", "model", "dataset", "seed", "status")


def table_rows(cells: list[Cell], runs: dict[str, Run]) -> list[dict[str, Any]]:
    rows = []
    for cell in cells:
        run = runs.get(cell.id)
        row: dict[str, Any] = {"cell": cell.id, "router": cell.router.display(), "model": cell.model.display(),
                               "dataset": cell.dataset.name, "seed": cell.seed,
                               "status": run.info.status if run else "PENDING"}
        metrics = run.data.metrics if run else {}
        for col in METRIC_COLUMNS:
            value = metrics.get(col.metric)
            row[col.header] = None if value is None else value * col.scale
        if run and run.data.tags.get(REASON):
            row["status"] += f" ({' '.join(run.data.tags[REASON].split())[:80]})"  # one line: a table cell
        rows.append(row)
    return rows


def _fmt(value: Any, digits: int) -> str:
    if value is None:
        return "—"
    if isinstance(value, float):
        return f"{value:,.{digits}f}"
    return str(value)


def shown_columns(rows: list[dict[str, Any]]) -> list[Column]:
    """Metric columns some row has a value for: an LM study shows no ROUGE, a summarization study no purity."""
    return [c for c in METRIC_COLUMNS if any(row.get(c.header) is not None for row in rows)]


def to_markdown(rows: list[dict[str, Any]]) -> str:
    headers = list(ID_HEADERS) + [c.header for c in shown_columns(rows)]
    digits = {c.header: c.digits for c in METRIC_COLUMNS}
    return render(headers, [{h: _fmt(row[h], digits.get(h, 0)) for h in headers} for row in rows], "md")


def to_csv(rows: list[dict[str, Any]]) -> str:
    return render(list(ID_HEADERS) + [c.header for c in shown_columns(rows)], rows, "csv")


def write_table(rows: list[dict], stem: Path, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    md, csv_path = stem.with_name(stem.name + "_table.md"), stem.with_name(stem.name + "_table.csv")
    md.write_text(to_markdown(rows))
    csv_path.write_text(to_csv(rows))
    if tracker and parent_run_id:
        tracker.log_artifact(parent_run_id, md, "tables")
        tracker.log_artifact(parent_run_id, csv_path, "tables")
    return md
