"""The reference pages are the code's: each committed page equals what `python -m workflows.reference` writes now,
and what it writes says what the code says (a field's default, a router's options, a metric's meaning)."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

from workflows.reference import PAGES, field_notes, write

REPO = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("name", sorted(PAGES))
def test_the_committed_page_is_the_generated_one(name, tmp_path):
    (generated,) = [p for p in write(tmp_path) if p.name == name]
    committed = REPO / "docs" / "reference" / name
    assert committed.read_text() == generated.read_text(), (
        f"docs/reference/{name} is stale: run `python -m workflows.reference docs/reference`")


def test_pages_carry_what_the_code_declares():
    from moe_models.routers.options import ROUTER_OPTIONS, TopKOptions
    from workflows.metric_names import EVAL_LOSS, GLOSSARY

    routers = PAGES["routers.md"]()
    assert all(f"## `{name}`" in routers for name in ROUTER_OPTIONS.names())
    assert "| `null_experts` | int (≥ 0) | `0` | unless default | Zero-computation experts (MoE++" in routers
    assert f"| `{EVAL_LOSS}` | {GLOSSARY[EVAL_LOSS]} |" in PAGES["metrics.md"]()
    study = PAGES["study.md"]()
    assert "| `steps` | int (> 0) | `100` | yes |" in study
    assert "| `compile` | bool | `False` | no |" in study  # how it runs, not what it trains
    assert field_notes(TopKOptions)["topk_group"] == "groups a token keeps; None = every group"


def test_the_site_builds_strict_with_the_generated_pages(tmp_path):
    """mkdocs.yml's site: no broken link, no page outside the nav (strict), the reference pages in it."""
    proc = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "-d", str(tmp_path / "site")], cwd=REPO,
                          capture_output=True, text=True, timeout=300, env={**os.environ, "NO_MKDOCS_2_WARNING": "1"})
    assert proc.returncode == 0, proc.stderr[-3000:]
    routers = (tmp_path / "site" / "reference" / "routers" / "index.html").read_text()
    assert "null_experts" in routers and "quantile_balancing" in routers
