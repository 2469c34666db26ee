"""Pretrained baselines (evaluation-only cells): HF seq2seq and causal LMs loaded from a local path decode the test
documents with the study's settings."""
import pytest
import torch

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


@pytest.mark.parametrize("kind,build", [("seq2seq", tiny_bart), ("causal", tiny_gpt2)])
def test_lora_finetuning_learns_the_training_summaries_and_trains_adapters_only(kind, build, tmp_path):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    from workflows.cell.baseline_finetune import finetune_lora

    torch.manual_seed(0)  # the tiny model's init and the adapters' draw: the same run whichever tests ran before
    folder = build(tmp_path)
    targets = ["c_attn", "c_fc", "c_proj"] if kind == "causal" else ["q_proj", "v_proj", "fc1", "fc2"]
    baseline = PretrainedBaseline(model=str(folder), kind=kind, finetune={"steps": 60, "lr": 3e-2, "batch_size": 2,
                                                                         "r": 4, "target_modules": targets})
    assert PretrainedBaseline(model=str(folder), finetune="lora").finetune.steps == 200  # `finetune: lora`
    assert baseline.display().endswith("+LoRA")  # beside the untuned one in the same study
    tokenizer = AutoTokenizer.from_pretrained(folder)
    family = AutoModelForCausalLM if kind == "causal" else AutoModelForSeq2SeqLM
    model = family.from_pretrained(folder)
    with torch.no_grad():  # transformers' N(0, 0.02) init of a 16-wide tied embedding cannot express a peaked output
        model.get_input_embeddings().weight.mul_(50)
    frozen = {n: p.detach().clone() for n, p in model.named_parameters()}
    logged: list[tuple[dict, int]] = []
    pairs = (["def add(a, b): return a + b", "def f(x): return x"], ["Return the value.", "Return the thing."])
    tuned = finetune_lora(model, tokenizer, baseline, *pairs, source_limit=32, target_tokens=8,
                          log=lambda metrics, step: logged.append((metrics, step)))
    losses = [m["finetune/loss"] for m, _ in logged if "finetune/loss" in m]
    assert len(losses) == 6 and losses[-1] < 0.5 * losses[0]  # two pairs, learned
    counts = logged[0][0]
    assert 0 < counts["summary/params_trainable"] < 0.5 * counts["summary/params_total"]
    for name, param in tuned.get_base_model().named_parameters():  # the pretrained weights did not move
        if "lora_" not in name:
            assert torch.equal(param, frozen[name.replace(".base_layer", "")]), name


def test_a_causal_lm_learns_only_the_summary_after_its_prompt(tmp_path):
    from transformers import AutoTokenizer

    from workflows.cell.baseline_finetune import IGNORE, _causal_batch

    tokenizer = AutoTokenizer.from_pretrained(tiny_gpt2(tmp_path))
    prompts = ["def f(x): return x\nTL;DR:", "x\nTL;DR:"]
    batch = _causal_batch(tokenizer, prompts, ["Return the value.", "Return."], target_tokens=3)
    for row, prompt in enumerate(prompts):
        n_prompt = len(tokenizer(prompt, add_special_tokens=False)["input_ids"])
        labels, mask = batch["labels"][row], batch["attention_mask"][row].bool()
        assert (labels[:n_prompt] == IGNORE).all() and (labels[~mask] == IGNORE).all()
        learned = labels[labels != IGNORE].tolist()
        assert learned[-1] == tokenizer.eos_token_id and len(learned) <= 4  # <= 3 summary tokens, then EOS
        assert learned == batch["input_ids"][row][n_prompt:n_prompt + len(learned)].tolist()
