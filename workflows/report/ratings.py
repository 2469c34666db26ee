"""Human ratings read back: the filled blind rating sheets (workflows/report/summarization.py writes them) joined with
their key, into per-system means with 95% intervals per criterion.

The scale, stated on the sheet itself: every criterion is an integer from 1 (very poor) to 5 (excellent). Each rating
is one summary of one document by one rater; the interval is a Student-t interval over the rated summaries.
"""
from __future__ import annotations

import csv
import math
from dataclasses import dataclass
from pathlib import Path

from moe_eval.bootstrap import t_interval
from workflows.report.render import render

RATING_CRITERIA = ("content", "coherence", "fluency", "factuality")
SCALE = (1, 5)
SCALE_TEXT = "1 (very poor) to 5 (excellent)"


def criterion_header(criterion: str) -> str:
    """The sheet's column for a criterion, with the scale in it so no rater has to guess."""
    return f"{criterion} ({SCALE[0]}-{SCALE[1]})"


class RatingError(ValueError):
    """A filled sheet that cannot be read: the message names the file, the row and the column."""


@dataclass(frozen=True)
class SystemRatings:
    system: str
    n: int
    means: dict[str, tuple[float, float]]  # criterion -> (mean, 95% half-width)


def read_key(path: Path) -> dict[str, str]:
    with open(path, newline="") as f:
        return {row["system_id"]: row["router"] for row in csv.DictReader(f)}


def read_sheet(path: Path, key: dict[str, str]) -> dict[str, dict[str, list[int]]]:
    """system -> criterion -> ratings; blank cells (not rated) are skipped, anything else off the scale is an error."""
    out: dict[str, dict[str, list[int]]] = {}
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        missing = [criterion_header(c) for c in RATING_CRITERIA if criterion_header(c) not in (reader.fieldnames or [])]
        if missing or "system_id" not in (reader.fieldnames or []):
            raise RatingError(f"{path}: not a moelab rating sheet (missing columns: {', '.join(missing or ['system_id'])})")
        for line, row in enumerate(reader, start=2):
            system = key.get(row["system_id"])
            if system is None:
                raise RatingError(f"{path}: row {line}: system_id {row['system_id']!r} is not in the key")
            for criterion in RATING_CRITERIA:
                text = (row[criterion_header(criterion)] or "").strip()
                if not text:
                    continue
                if not text.isdigit() or not SCALE[0] <= int(text) <= SCALE[1]:
                    raise RatingError(f"{path}: row {line}, column {criterion_header(criterion)!r}: {text!r} is not "
                                      f"an integer from {SCALE_TEXT}")
                out.setdefault(system, {}).setdefault(criterion, []).append(int(text))
    return out


def pooled_ratings(sheets: list[Path], key_path: Path) -> list[SystemRatings]:
    """Several raters' sheets (the same key) pooled per system."""
    key = read_key(key_path)
    merged: dict[str, dict[str, list[int]]] = {}
    for sheet in sheets:
        for system, by_criterion in read_sheet(sheet, key).items():
            for criterion, values in by_criterion.items():
                merged.setdefault(system, {}).setdefault(criterion, []).extend(values)
    return [SystemRatings(system, max(len(v) for v in by.values()),
                          {c: t_interval([float(x) for x in by.get(c, [])]) if by.get(c) else (math.nan, math.nan)
                           for c in RATING_CRITERIA})
            for system, by in sorted(merged.items())]


def ratings_report(sheets: list[Path], key_path: Path, fmt: str = "md") -> str:
    headers = ["system", "ratings", *RATING_CRITERIA]
    rows = []
    for r in pooled_ratings(sheets, key_path):
        row = {"system": r.system, "ratings": str(r.n)}
        for c in RATING_CRITERIA:
            mean, half = r.means[c]
            row[c] = "—" if math.isnan(mean) else f"{mean:.2f}" + ("" if math.isnan(half) else f" ± {half:.2f}")
        rows.append(row)
    table = render(headers, rows, fmt)
    return table if fmt != "md" else table + f"\n- Scale: {SCALE_TEXT}; mean ± 95% t-interval over rated summaries.\n"
