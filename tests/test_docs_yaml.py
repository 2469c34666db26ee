"""Every YAML block of the README and the docs is a study that validates, or a fragment of one that validates once
completed with a fixed preamble: a documented field that no longer exists, or a value out of range, fails here."""
import copy
import re
from pathlib import Path

import pytest
import yaml

from workflows.study.loading import parse_study

REPO = Path(__file__).resolve().parent.parent
PAGES = [REPO / "README.md", *sorted(p for p in (REPO / "docs").rglob("*.md") if "reference" not in p.parts)]
BLOCKS = [(page, i, text) for page in PAGES
          for i, text in enumerate(re.findall(r"```ya?ml\n(.*?)```", page.read_text(), re.S))]
PREAMBLE = {"name": "fragment",
            "routers": [{"name": "topk", "k": 2, "label": "topk(k=2)"}, {"name": "dense", "label": "dense"}],
            "models": [{"name": "gpt", "num_experts": 4}],
            "datasets": [{"name": "builtin:domains"}]}


def with_local_files(data, tmp_path: Path):
    """`file:` datasets name files on the reader's machine: the same glob under tmp_path, with a file in it."""
    text = yaml.safe_dump(data)
    for pattern in set(re.findall(r"file:(/[^\s'\"]+)", text)):
        local = tmp_path / pattern.lstrip("/")
        local.parent.mkdir(parents=True, exist_ok=True)
        (local.parent / local.name.replace("*", "part-0")).write_text("")
        text = text.replace(f"file:{pattern}", f"file:{local}")
    return yaml.safe_load(text)


def router_named(label: str, i: int) -> dict:
    """The router a label displays (`top_p(max_k=4,p=0.4)`: that top-p, so that a claim on what only a dynamic router
    varies validates); any other label a top-2, each its own training."""
    if match := re.fullmatch(r"(\w+)\((.*)\)", label):
        options = dict(pair.split("=", 1) for pair in match.group(2).split(","))
        return {"name": match.group(1), **{k: yaml.safe_load(v) for k, v in options.items()}, "label": label}
    return {"name": "topk", "k": 2, "jitter": 0.01 * (i + 1), "label": label}


def completed(block) -> dict:
    """A whole study as is; a section (or a list of claims) inside the preamble, with a router for every label the
    claims name."""
    if isinstance(block, dict) and "routers" in block:
        return block
    study = copy.deepcopy(PREAMBLE)
    claims = block if isinstance(block, list) else block.get("claims", [])
    labels = {c.get(key) for c in claims for key in ("system", "against")} | {
        r for c in claims for r in (c.get("matched_compute") or {}).get("references", [])}
    study["routers"] += [router_named(label, i) for i, label in enumerate(sorted(labels - {None, "topk(k=2)"}))]
    datasets = {c.get(key) for c in claims for key in ("dataset", "against_dataset")} - {None}
    if datasets:
        study["datasets"] = [{"name": name} for name in sorted(datasets)]
    if isinstance(block, list):
        study["claims"] = block
    else:
        study.update(block)
        if "sweep" in block:
            study["routers"][0]["balancing"] = {"switch_lbl": 0.01}
    return study


@pytest.mark.parametrize("page,index,text", BLOCKS, ids=[f"{p.name}#{i}" for p, i, _ in BLOCKS])
def test_the_block_validates(page, index, text, tmp_path):
    study = with_local_files(completed(yaml.safe_load(text)), tmp_path)
    parse_study(study, f"{page.name} block {index}")  # raises StudyError, naming the field, when it does not


def test_every_page_with_a_study_is_read():
    assert {p.name for p, _, _ in BLOCKS} >= {"README.md", "studies.md", "sweeps.md", "claims.md", "data.md"}
