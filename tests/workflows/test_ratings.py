"""Filled rating sheets read back: the 1-5 scale stated in every criterion's column, several raters pooled per system
through the key, blank cells skipped, anything off the scale refused naming its file, row and column, and the CLI."""
from __future__ import annotations

import csv
import io

import pytest

from moe_eval.bootstrap import t_interval
from workflows.driver.cli import main
from workflows.report.ratings import RATING_CRITERIA, RatingError, criterion_header, pooled_ratings

COLUMNS = ["item", "document_id", "source_excerpt", "system_id", "summary", *map(criterion_header, RATING_CRITERIA)]


def sheet(path, rows):
    with open(path, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(COLUMNS)
        for i, (system_id, scores) in enumerate(rows, 1):
            writer.writerow([i, f"doc{i}", "source", system_id, "a summary", *scores])
    return path


@pytest.fixture()
def key(tmp_path):
    path = tmp_path / "s_rating_key.csv"
    path.write_text("system_id,router\nS1,hash\nS2,top2\n")
    return path


def test_two_raters_pooled_per_system_with_t_intervals(tmp_path, key):
    one = sheet(tmp_path / "a.csv", [("S1", [5, 4, 4, 3]), ("S2", [2, 2, 3, ""]), ("S1", [4, 4, 5, 3])])
    two = sheet(tmp_path / "b.csv", [("S1", [3, 4, 4, 4]), ("S2", [1, 2, 2, 2])])
    found = {r.system: r for r in pooled_ratings([one, two], key)}
    assert found["hash"].n == 3 and found["top2"].n == 2
    assert found["hash"].means["content"] == pytest.approx(t_interval([5.0, 4.0, 3.0]))
    assert found["top2"].means["factuality"][0] == 2.0  # the blank cell is not a rating
    assert criterion_header("fluency") == "fluency (1-5)"


@pytest.mark.parametrize("bad,message", [(["S1", [6, 4, 4, 4]], "row 2, column 'content (1-5)': '6'"),
                                         (["S1", [4, "good", 4, 4]], "column 'coherence (1-5)': 'good'"),
                                         (["S9", [4, 4, 4, 4]], "row 2: system_id 'S9' is not in the key")])
def test_a_rating_off_the_scale_is_named(tmp_path, key, bad, message):
    with pytest.raises(RatingError, match=message.replace("(", r"\(").replace(")", r"\)")):
        pooled_ratings([sheet(tmp_path / "a.csv", [tuple(bad)])], key)


def test_the_cli_reads_filled_sheets_and_exits_2_on_a_bad_one(tmp_path, key, capsys):
    study = tmp_path / "s.yaml"
    study.write_text("name: s\nrouters: [{name: hash}]\nmodels: [{name: gpt, num_experts: 4}]\n"
                     "datasets: [{name: 'builtin:domains'}]\n")
    good = sheet(tmp_path / "s_rating_sheet.csv", [("S1", [5, 4, 4, 3]), ("S2", [2, 2, 3, 1])])
    assert main(["aggregate", str(study), "--workdir", str(tmp_path), "--ratings", str(good)]) == 0
    table = capsys.readouterr().out
    assert "| hash | 1 | 5.00 |" in table and "Scale: 1 (very poor) to 5 (excellent)" in table
    bad = sheet(tmp_path / "bad.csv", [("S1", [0, 4, 4, 3])])
    assert main(["aggregate", str(study), "--ratings", str(bad), "--ratings-key", str(key)]) == 2
    assert "column 'content (1-5)': '0'" in capsys.readouterr().err
    assert main(["aggregate", str(study), "--ratings", str(tmp_path / "none.csv"), "--ratings-key", str(key)]) == 2
