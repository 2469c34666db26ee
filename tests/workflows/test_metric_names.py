"""Metric names live in one table (workflows/metric_names.py): no code outside it writes one as a literal, and the
glossary the docs are generated from explains every name in the table."""
from __future__ import annotations

import re
from pathlib import Path

from workflows import metric_names

REPO = Path(__file__).resolve().parents[2]
# A name or a name's prefix, or an f-string that builds one (artifact paths such as eval/sequence_losses.json are not
# metrics).
LITERAL = re.compile(r"""f["'](?:train|eval|summary)/|["'](?:train|eval|summary)/[^"'.]*["']""")


def test_no_metric_name_is_written_as_a_literal_outside_the_table():
    found = [f"{path.relative_to(REPO)}:{number}: {line.strip()}"
             for package in ("workflows", "tuning", "moe_models", "moe_eval", "moe_data")
             for path in (REPO / package).rglob("*.py") if path.name != "metric_names.py"
             for number, line in enumerate(path.read_text().splitlines(), 1) if LITERAL.search(line)]
    assert not found, "name these through workflows.metric_names:\n" + "\n".join(found)


def test_the_glossary_explains_every_name_of_the_table():
    names = {value for key, value in vars(metric_names).items() if key.isupper() and isinstance(value, str)}
    assert names == set(metric_names.GLOSSARY)
    assert all(len(meaning) > 10 for meaning in metric_names.GLOSSARY.values())
    assert all(re.fullmatch(r"(train|eval|summary)(/[a-z_]+)*", name) for name in names)
