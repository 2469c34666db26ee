"""Pretrained baselines (evaluation-only cells): HF seq2seq and causal LMs loaded from a local path decode the test
documents with the study's settings."""
import pytest

from tests.hf_tiny import tiny_bart, tiny_gpt2
from workflows.cell.pretrained import summarize_with
from workflows.study.cells import PretrainedCell
from workflows.study.entries import DatasetEntry
from workflows.study.sections import PretrainedBaseline, SummarizationConfig

DOCS = ["def add(a, b):\n    return a + b", "Return the value of the thing. " * 100, "x"]  # 2nd: > 256 positions
CFG = SummarizationConfig(num_beams=2, max_new_tokens=6, eval_batch_size=2)


@pytest.mark.parametrize("kind,build", [("seq2seq", tiny_bart), ("causal", tiny_gpt2)])
def test_local_model_summarizes_every_document_deterministically(kind, build, tmp_path):
    baseline = PretrainedBaseline(model=str(build(tmp_path)), kind=kind)  # 512 source tokens: cut to fit positions
    first = summarize_with(baseline, DOCS, CFG)
    assert len(first) == 3 and all(isinstance(s, str) and "\n" not in s for s in first)
    assert summarize_with(baseline, DOCS, CFG) == first


def test_pretrained_cell_id_tracks_what_is_evaluated_not_its_label(tmp_path):
    dataset = DatasetEntry(name="builtin:docstrings")
    cell = PretrainedCell(PretrainedBaseline(model="facebook/bart-large-xsum"), dataset, CFG)
    relabelled = PretrainedCell(PretrainedBaseline(model="facebook/bart-large-xsum", label="BART"), dataset, CFG)
    other_beam = PretrainedCell(cell.baseline, dataset, CFG.model_copy(update={"num_beams": 4}))
    presentation = PretrainedCell(cell.baseline, dataset, CFG.model_copy(update={"baseline": "x", "samples": 2}))
    assert cell.id == relabelled.id == presentation.id != other_beam.id
    assert cell.baseline.display() == "bart-large-xsum"


def test_prompts_wrap_the_document_per_kind():
    assert PretrainedBaseline(model="t5-base", prompt="summarize: {document}").input_text("x") == "summarize: x"
    assert PretrainedBaseline(model="facebook/bart-large-xsum").input_text("x") == "x"
    assert PretrainedBaseline(model="gpt2", kind="causal").input_text("x") == "x\nTL;DR:"


def test_a_missing_local_model_path_is_a_study_error():
    with pytest.raises(ValueError, match="no such folder"):
        PretrainedBaseline(model="./models/nope")
    with pytest.raises(ValueError, match="must contain {document}"):
        PretrainedBaseline(model="gpt2", kind="causal", prompt="Summarize:")
