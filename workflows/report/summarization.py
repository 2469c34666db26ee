"""The summarization report, built from what the cells logged to MLflow (per-document predictions and scores).

Its statistics come from the module every study's tables use (workflows/report/pooled.py): seeds pooled with the
same intervals and the same fewer-than-3-seeds rule, and the documents x seeds bootstrap against the baseline.
What only summarization has lives here: reading the per-document score sheets, a samples table (source excerpt,
reference, each router's output for the same documents) and a blind human-rating sheet with its key kept apart.
"""
from __future__ import annotations

import csv
import io
import json
import random
from collections import defaultdict

from pathlib import Path

from moe_eval.score_sheet import ScoreSheet
from workflows.report.render import markdown
from workflows.report.pooled import SystemRuns, document_difference_frame, document_metrics_frame
from workflows.report.ratings import RATING_CRITERIA, criterion_header
from workflows.study.cells import Cell, pretrained_cells
from workflows.study.schema import Study
from workflows.tracking import BLEU_SIGNATURE_TAG, PREDICTIONS_ARTIFACT, Tracker

EXCERPT_CHARS = 300


def _system(systems: dict[str, SystemRuns], label: str, seed: int, run, tracker: Tracker) -> None:
    rows = [json.loads(line) for line in tracker.read_text(run.info.run_id, PREDICTIONS_ARTIFACT).splitlines()]
    signature = run.data.tags.get(BLEU_SIGNATURE_TAG, "")
    system = systems.setdefault(label, SystemRuns(label, [], [], [], [r["pair_id"] for r in rows], signature))
    system.seeds.append(seed)
    system.sheets.append(ScoreSheet.from_rows(rows, signature))
    system.predictions.append([r["prediction"] for r in rows])


def load_systems(study: Study, cells: list[Cell], runs: dict, tracker: Tracker,
                 pretrained_runs: dict | None = None) -> dict[tuple[str, str], list[SystemRuns]]:
    """(model, dataset) -> systems (routers in study order, then pretrained baselines), from the per-document
    predictions of every FINISHED summarization run."""
    finished = lambda run: run is not None and run.info.status == "FINISHED"  # noqa: E731
    grouped: dict[tuple[str, str], dict[str, SystemRuns]] = defaultdict(dict)
    for cell in cells:
        if cell.summarization is not None and finished(runs.get(cell.id)):
            _system(grouped[(cell.model.display(), cell.dataset.name)], cell.router.display(), cell.seed,
                    runs[cell.id], tracker)
    for cell in pretrained_cells(study):  # evaluated once (decoding is deterministic), shown in every model's table
        run = (pretrained_runs or {}).get(cell.id)
        for (model, dataset), systems in grouped.items():
            if dataset == cell.dataset.name and finished(run):
                _system(systems, cell.baseline.display(), 0, run, tracker)
    return {key: list(systems.values()) for key, systems in grouped.items()}


def _differences(systems: list[SystemRuns], baseline: str, num_resamples: int) -> str:
    frame = document_difference_frame(systems, baseline, num_resamples)
    return markdown(*frame) if frame else f"(baseline {baseline!r} has no finished cells: no p-values)\n"


def _one_line(text: str, limit: int) -> str:
    flat = " ".join(text.split()).replace("|", "\\|")
    return flat if len(flat) <= limit else flat[:limit - 1] + "…"


def samples_table(systems: list[SystemRuns], documents: list[str], references: list[str], count: int) -> str:
    """First seed's output of every router for the first `count` test documents."""
    lines = []
    for i in range(min(count, len(documents))):
        lines += [f"**{systems[0].pair_ids[i]}** — source: {_one_line(documents[i], EXCERPT_CHARS)}", "",
                  "| system | summary |", "|---|---|", f"| reference | {_one_line(references[i], 400)} |"]
        lines += [f"| {s.label} | {_one_line(s.predictions[0][i], 400)} |" for s in systems]
        lines.append("")
    return "\n".join(lines)


def rating_sheet(systems: list[SystemRuns], documents: list[str], count: int, seed: int = 0) -> tuple[str, str]:
    """(sheet CSV, key CSV): per document, every system's summary in a shuffled order under an anonymous id. Each
    criterion's column states its scale (workflows/report/ratings.py); `moelab aggregate --ratings` reads filled
    sheets back."""
    rng = random.Random(seed)
    ids = [f"S{i + 1}" for i in range(len(systems))]
    rng.shuffle(ids)
    key = dict(zip(ids, (s.label for s in systems)))
    sheet, key_csv = io.StringIO(), io.StringIO()
    writer = csv.writer(sheet)
    writer.writerow(["item", "document_id", "source_excerpt", "system_id", "summary",
                     *(criterion_header(c) for c in RATING_CRITERIA)])
    item = 0
    for i in range(min(count, len(documents))):
        order = list(zip(ids, systems))
        rng.shuffle(order)
        for system_id, system in order:
            item += 1
            writer.writerow([item, system.pair_ids[i], _one_line(documents[i], EXCERPT_CHARS), system_id,
                             system.predictions[0][i], *([""] * len(RATING_CRITERIA))])
    csv.writer(key_csv).writerows([["system_id", "router"], *sorted(key.items())])
    return sheet.getvalue(), key_csv.getvalue()


def write_summarization_report(study: Study, cells: list[Cell], runs: dict, tracker: Tracker,
                               texts: dict[str, tuple[list[str], list[str]]], out_dir: Path,
                               parent_run_id: str | None = None, pretrained_runs: dict | None = None) -> Path | None:
    """Markdown report + rating sheet + key under out_dir (and on the study's MLflow run). `texts` maps a dataset
    name to its test (documents, references). None when no summarization cell has finished."""
    grouped = load_systems(study, cells, runs, tracker, pretrained_runs)
    if not grouped:
        return None
    cfg = study.summarization
    out_dir.mkdir(parents=True, exist_ok=True)
    parts = [f"# {study.name}: summarization\n"]
    for (model, dataset), systems in grouped.items():
        documents, references = texts[dataset]
        parts += [f"## {model} on {dataset} ({systems[0].sheets[0].num_documents} test documents)\n",
                  "Mean ± 95% t-interval half-width across seeds. ROUGE (stemmed) and BERTScore ×100; "
                  f"BLEU: sacreBLEU `{systems[0].bleu_signature}`.\n", markdown(*document_metrics_frame(systems))]
        if cfg.baseline:
            parts += [f"\nDifference to **{cfg.baseline}** (seeds pooled) and two-sided bootstrap p-value "
                      f"({cfg.bootstrap_resamples} resamples: test documents paired across systems, each system's "
                      "seeds resampled too):\n",
                      _differences(systems, cfg.baseline, cfg.bootstrap_resamples)]
        parts += ["\n### Samples (first seed)\n", samples_table(systems, documents, references, cfg.samples)]
        sheet, key = rating_sheet(systems, documents, cfg.samples)
        stem = f"{study.name}_{model}_{dataset.replace(':', '_')}"
        for name, text in ((f"{stem}_rating_sheet.csv", sheet), (f"{stem}_rating_key.csv", key)):
            (out_dir / name).write_text(text)
            if parent_run_id:
                tracker.log_artifact(parent_run_id, out_dir / name, "summarization")
    report = out_dir / f"{study.name}_summarization.md"
    report.write_text("\n".join(parts))
    if parent_run_id:
        tracker.log_artifact(parent_run_id, report, "summarization")
    return report
