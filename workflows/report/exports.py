"""The pooled comparison as Markdown (with the regime check in words), CSV, LaTeX (booktabs, for a paper) and HTML,
and the files a finished study leaves in its workdir and on its MLflow run."""
from __future__ import annotations

import json
from pathlib import Path

from mlflow.entities import Run
from mlflow.exceptions import MlflowException

from workflows.report.pooled import (
    MIN_SEEDS_FOR_INTERVAL,
    PooledRow,
    difference_frame,
    frame_rows,
    pooled_rows,
    regime_verdicts,
)
from workflows.metric_names import EVAL_LOSS
from workflows.report.render import markdown, render
from workflows.study.cells import Cell
from workflows.study.claims import Claim
from workflows.tracking import SEQUENCE_LOSSES, Tracker


def sequence_losses(tracker: Tracker, cells: list[Cell], runs: dict[str, Run]) -> dict[str, list[float]]:
    """cell id -> its final evaluation's loss per sequence, for the finished cells that logged one (decoder LMs)."""
    out = {}
    for cell in cells:
        run = runs.get(cell.id)
        if run is None or run.info.status != "FINISHED":
            continue
        try:
            out[cell.id] = json.loads(tracker.read_text(run.info.run_id, SEQUENCE_LOSSES))
        except (MlflowException, OSError, ValueError):  # seq2seq cells, cells from before the artifact existed
            continue
    return out


def pool(cells: list[Cell], runs: dict[str, Run], baseline: str | None,
         tracker: Tracker | None = None) -> list[PooledRow]:
    """Seeds pooled; with a tracker and a baseline, also the two-level bootstrap over the cells' sequence losses."""
    return pool_with_losses(cells, runs, baseline, tracker)[0]


def pool_with_losses(cells: list[Cell], runs: dict[str, Run], baseline: str | None, tracker: Tracker | None,
                     claims: list[Claim] = ()) -> tuple[list[PooledRow], dict[str, list[float]]]:
    """Seeds pooled, and the cells' sequence losses, read once (one artifact per cell) for both the pooled table's
    bootstrap and the claims on eval/loss; read only when one of them needs them."""
    needed = tracker is not None and (baseline is not None or any(c.metric == EVAL_LOSS for c in claims))
    losses = sequence_losses(tracker, cells, runs) if needed else {}
    return pooled_rows(cells, runs, baseline, losses), losses


def pooled_report(cells: list[Cell], runs: dict[str, Run], baseline: str | None, fmt: str = "md",
                  rows: list[PooledRow] | None = None, tracker: Tracker | None = None) -> str:
    """The pooled table in `fmt`; Markdown adds the regime check and how to read the intervals. `rows`: already
    pooled (one pooling for several formats); `tracker`: where the cells' sequence losses are read for the
    bootstrap."""
    rows = pool(cells, runs, baseline, tracker) if rows is None else rows
    headers, cells_text = frame_rows(rows, baseline)
    table = render(headers, cells_text, fmt)
    if fmt != "md":
        return table
    notes = [f"Mean ± 95% Student-t half-width across seeds (no interval below {MIN_SEEDS_FOR_INTERVAL} seeds)."]
    if baseline is not None:
        notes.append(f"Δ: paired over the seeds both routers ran (same initialization and data order); "
                     "'within noise' when its interval contains 0.")
        if any(r.vs_baseline_bootstrap for r in rows):
            notes.append("Δ 95% CI (seeds x sequences bootstrap): the final evaluation's per-sequence losses, "
                         "paired (every cell sees the same sequences), resampled over seeds and then sequences, "
                         "so both seed-to-seed and sequence-to-sequence variance count.")
    verdicts = regime_verdicts(cells, rows)
    notes += [f"Regime check: {v.sentence()}" for v in verdicts] or [
        "Regime check: not possible — the study has no dense baselines of two widths (equal active FLOPs and equal "
        "parameters), so it cannot say whether expert capacity matters at this size."]
    report = table + "\n" + "\n".join(f"- {n}" for n in notes) + "\n"
    if baseline is not None:
        diff_headers, diffs = difference_frame(rows, baseline)
        if diffs:
            report += (f"\nEvery metric against {baseline} (system - baseline, paired over seeds; * the 95% interval "
                       f"excludes 0):\n\n" + markdown(diff_headers, diffs))
    return report


def write_pooled_report(cells: list[Cell], runs: dict[str, Run], baseline: str | None, stem: Path,
                        tracker: Tracker | None = None, parent_run_id: str | None = None,
                        rows: list[PooledRow] | None = None) -> Path:
    """<study>_pooled.{md,csv,tex,html} in the workdir, and on the study's run under tables/. `rows`: already
    pooled (the driver pools once for the report and the plots)."""
    paths, rows = [], pool(cells, runs, baseline, tracker) if rows is None else rows
    for fmt, suffix in (("md", "md"), ("csv", "csv"), ("latex", "tex"), ("html", "html")):
        path = stem.with_name(f"{stem.name}_pooled.{suffix}")
        path.write_text(pooled_report(cells, runs, baseline, fmt, rows))
        paths.append(path)
    if tracker and parent_run_id:
        for path in paths:
            tracker.log_artifact(parent_run_id, path, "tables")
    return paths[0]


def write_claims_report(study, cells: list[Cell], runs: dict[str, Run], pooled: list[PooledRow],
                        losses: dict[str, list[float]], stem: Path, tracker: Tracker,
                        parent_run_id: str | None) -> Path:
    """<study>_claims.md in the workdir and on the study's run: each claim's computed verdict."""
    from workflows.report.claims import claims_report

    path = stem.with_name(f"{stem.name}_claims.md")
    path.write_text(claims_report(study.claims, study.baseline, cells, runs, pooled, losses))
    if parent_run_id:
        tracker.log_artifact(parent_run_id, path, "tables")
    return path
