"""The one table renderer: a table (headers and rows of cell values, already formatted as text) rendered to Markdown,
CSV, LaTeX (booktabs, for a paper) or HTML. Every table moelab prints or logs goes through here: the comparison table,
the pooled report, the summarization report, sweep tables, the router characterization."""
from __future__ import annotations

import csv
import io
from typing import Any

FORMATS = ("md", "csv", "latex", "html")


def markdown(headers: list[str], rows: list[dict[str, Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(str(row[h]) for h in headers) + " |" for row in rows]
    return "\n".join(lines) + "\n"


def render(headers: list[str], rows: list[dict[str, Any]], fmt: str) -> str:
    if fmt == "md":
        return markdown(headers, rows)
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.DictWriter(out, fieldnames=headers, extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        return out.getvalue()
    import pandas as pd  # through MLflow's dependencies; only these two formats need it

    frame = pd.DataFrame(rows, columns=headers)
    if fmt == "latex":  # booktabs rules (\toprule, \midrule, \bottomrule), special characters escaped
        styler = frame.style.hide(axis="index").format(escape="latex").format_index(escape="latex", axis=1)
        return styler.to_latex(hrules=True, column_format="l" * len(headers)).replace(
            "±", r"$\pm$").replace("Δ", r"$\Delta$")
    if fmt == "html":
        return frame.to_html(index=False, border=0)
    raise ValueError(f"format {fmt!r}; valid: {', '.join(FORMATS)}")
