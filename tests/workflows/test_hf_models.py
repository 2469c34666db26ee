"""`hf` models in a study: every bad combination fails before launch with the field named; a cell: source runs
before the cells that start from it, and is part of their identity; and, through the real stack, an upcycled
checkpoint of a moelab-trained dense cell trains with LoRA, is killed, and resumes without a duplicated run."""
from __future__ import annotations

import copy
import os
import signal

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.hf_tiny import tiny_causal_lm
from tests.processes import moelab_process
from tests.suite import extended
from tests.workflows.test_resume import assert_one_point_per_step, wait_until_logged
from workflows.study.cells import expand
from workflows.study.errors import StudyError
from workflows.study.loading import parse_study
from workflows.tracking import CHECKPOINT_ARTIFACT

LLAMA = {"name": "llama", "label": "llama", "routers": ["dense"], "d_model": 64, "n_heads": 4, "num_experts": 4, "expert_hidden": 64}
UPCYCLE = {
    "name": "upcycle",
    "routers": [{"name": "dense"}, {"name": "topk", "k": 2, "renormalize": True, "label": "top2"}],
    "models": [LLAMA, {"name": "hf", "label": "upcycled", "pretrained": "cell:llama/dense",
                       "upcycle": {"num_experts": 4, "noise": 0.01}}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 80, "micro_batch_size": 8, "seq_len": 64, "warmup_steps": 2, "log_interval": 10,
                 "eval_interval": 40, "eval_batches": 2, "checkpoint_interval": 10,
                 "lora": {"r": 4, "target_modules": ["q_proj", "v_proj"], "train_experts": True}},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 2},
}


def problems(study: dict) -> str:
    with pytest.raises(StudyError) as err:
        parse_study(study)
    return "\n".join(err.value.problems)


def with_model(model: dict, routers: list[dict] | None = None, **training) -> dict:
    study = copy.deepcopy(UPCYCLE)
    study["models"] = [model]
    study["routers"] = routers or study["routers"]
    study["training"].update(training)
    return study


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("hf")
    return {kind: str(tiny_causal_lm(kind, root / kind, vocab_size=320)) for kind in ("llama", "mixtral", "gpt_oss")}


def test_bad_hf_entries_fail_before_launch_naming_the_field(folders, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    top2 = [{"name": "topk", "k": 2}]
    cases = {
        "upcycle on an MoE checkpoint": (
            with_model({"name": "hf", "pretrained": folders["mixtral"], "upcycle": {"num_experts": 4}}, top2),
            "routers[0]: on models[0] (hf), upcycle: the checkpoint is already an MoE (mixtral, 4 experts)"),
        "router swap on a dense checkpoint": (
            with_model({"name": "hf", "pretrained": folders["llama"]}, top2),
            "a routed router on a dense checkpoint (llama) needs upcycle"),
        "dense router on an MoE checkpoint": (
            with_model({"name": "hf", "pretrained": folders["mixtral"]}, [{"name": "dense"}]),
            "router dense on an MoE checkpoint (mixtral)"),
        "a LoRA target that does not exist": (
            with_model({"name": "hf", "pretrained": folders["mixtral"]}, top2,
                       lora={"target_modules": ["q_proj", "qkv"]}),
            "training.lora.target_modules: 'qkv' is no linear of models[0]'s checkpoint; valid: k_proj, lm_head"),
        "a hub name with no network": (
            with_model({"name": "hf", "pretrained": "someorg/some-moe"}, top2),
            "models[0].pretrained: 'someorg/some-moe' is not a local folder, not in the Hugging Face cache, and the "
            "hub (huggingface.co) is unreachable"),
        "a gate copied into a router without one": (
            with_model({"name": "hf", "pretrained": folders["mixtral"], "init_router": "pretrained"},
                       [{"name": "hash"}]),
            "init_router: pretrained copies the checkpoint's linear gate, and hash has no linear scorer"),
        "more experts per token than the checkpoint has": (
            with_model({"name": "hf", "pretrained": folders["mixtral"]}, [{"name": "topk", "k": 6}]),
            "routes up to 6 experts per token; allowed: at most models[0].num_experts=4"),
        "a cell source naming no model of the study": (
            {**UPCYCLE, "models": [LLAMA, {"name": "hf", "pretrained": "cell:gpt/dense", "upcycle": {}}]},
            "models[1].pretrained: cell source model 'gpt' is not a model of this study; valid: llama, hf"),
        "a cell source that cannot be exported": (
            {**UPCYCLE, "models": [{**LLAMA, "routers": None}, {"name": "hf", "pretrained": "cell:llama/top2"}],
             "routers": [{"name": "topk", "k": 2, "label": "top2"}]},
            "cell source llama/top2: an MoE source is exported as Mixtral"),
        "a cell source its model is not crossed with": (
            {**UPCYCLE, "models": [LLAMA, {"name": "hf", "pretrained": "cell:llama/top2"}]},
            "cell source llama/top2: models' routers leave out 'top2', so that cell does not exist"),
        "a model crossed with a router the study lacks": (
            {**UPCYCLE, "models": [{**LLAMA, "routers": ["top3"]}]},
            "models[0].routers: 'top3' is not a router of this study; valid: dense, top2"),
        "GPT-OSS's gate copied into a router without its logit bias": (
            with_model({"name": "hf", "pretrained": folders["gpt_oss"], "init_router": "pretrained"}, top2),
            "init_router: pretrained copies GPT-OSS's router with its learned logit bias; set router_bias: true"),
        "a malformed cell source": (
            with_model({"name": "hf", "pretrained": "cell:llama"}),
            "a cell source is cell:<model label>/<router label>"),
    }
    for name, (study, expected) in cases.items():
        assert expected in problems(study), name


def test_a_cell_source_runs_first_and_is_part_of_its_consumers_identity():
    cells = expand(parse_study(UPCYCLE))
    sources = {c.id: c for c in cells if c.model.name == "llama"}
    consumers = [c for c in cells if c.model.name == "hf"]
    assert [c.model.name for c in cells] == ["llama", "hf", "hf"]  # models[0].routers: the source only
    dense_source = next(c for c in sources.values() if c.router.name == "dense")
    assert {c.source_id for c in consumers} == {dense_source.id}
    longer = copy.deepcopy(UPCYCLE)
    longer["models"][0]["n_layers"] = 3  # retraining the source retrains what starts from it
    assert not {c.id for c in consumers} & {c.id for c in expand(parse_study(longer)) if c.model.name == "hf"}


@pytest.mark.slow
@extended("tests/moe_models/test_pretrained_surgery.py::test_lora_trains_adapters_and_routers_only_and_starts_as_the_swapped_model",
          "tests/moe_models/test_pretrained_surgery.py::test_function_preserving_upcycling_matches_the_dense_model_at_step_zero",
          "tests/moe_models/test_pretrained_surgery.py::test_swapped_topk_router_from_the_gate_reproduces_the_moe_checkpoint",
          "tests/workflows/test_hf_models.py::test_a_cell_source_runs_first_and_is_part_of_its_consumers_identity",
          "tests/workflows/test_resume.py::test_sigkill_then_rerun_resumes_without_retraining_or_duplicates")
def test_upcycled_and_swapped_checkpoints_train_with_lora_killed_and_resumed_without_duplicates(tmp_path, folders):
    """An upcycled cell: source and a router swap into a local Mixtral checkpoint, in one study."""
    study = copy.deepcopy(UPCYCLE)
    study["models"][1]["routers"] = ["top2"]  # three cells: the swap trains beside the source, then the upcycled one
    study["models"].append({"name": "hf", "label": "swapped", "pretrained": folders["mixtral"], "routers": ["top2"]})
    path, workdir = tmp_path / "upcycle.yaml", tmp_path / "work"
    path.write_text(yaml.safe_dump(study))
    cells = expand(parse_study(study))
    target = next(c for c in cells if c.model.display() == "upcycled" and c.router.name == "topk")
    proc = moelab_process("run", path, workdir)
    try:
        wait_until_logged(proc, workdir, "upcycle", target.id, 30)  # past its step-20 checkpoint
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        rerun = moelab_process("run", path, workdir)
        assert rerun.wait(timeout=600) == 0
    finally:
        for p in (proc, locals().get("rerun")):
            if p is not None and p.poll() is None:
                os.killpg(p.pid, signal.SIGKILL)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    exp = client.get_experiment_by_name("upcycle")
    runs = {r.data.tags["moelab.cell_id"]: r for r in client.search_runs([exp.experiment_id],
                                                                         "tags.`moelab.role` = 'cell'")}
    assert set(runs) == {c.id for c in cells} and len(client.search_runs([exp.experiment_id])) == 4  # + study
    assert all(r.info.status == "FINISHED" for r in runs.values())
    resumed = runs[target.id]
    assert int(resumed.data.tags["moelab.resumed_from_step"]) >= 20
    assert_one_point_per_step(client, resumed)
    assert [m.step for m in client.get_metric_history(resumed.info.run_id, "train/loss")] == list(range(10, 81, 10))
    source = runs[target.source_id]
    assert [a.path for a in client.list_artifacts(source.info.run_id, CHECKPOINT_ARTIFACT)]  # the export it started from
    params = {c.id: (runs[c.id].data.metrics["summary/params_trainable"], runs[c.id].data.metrics["summary/params_total"])
              for c in cells}
    for cell in cells:
        trainable, total = params[cell.id]
        assert (trainable < total) == (cell.model.name == "hf"), cell.title  # LoRA: pretrained (hf) cells only
    for cell in cells:
        if cell.router.name == "topk":
            assert runs[cell.id].data.metrics["eval/moe/experts_per_token"] == pytest.approx(2.0), cell.title


def test_a_checkpoints_own_tokenizer_tokenizes_its_lm_data(tmp_path, folders):
    from tests.hf_tiny import _tokenizer

    from moe_data.prepare import load_prepared, prepare
    from moe_data.spec import DataSpec

    tokenizer = _tokenizer(tmp_path / "tok")
    spec = DataSpec("builtin:domains", 300, 20_000, tokenizer=str(tmp_path / "tok"))
    data = load_prepared(prepare(spec, tmp_path / "cache"))
    assert data.vocab_size == len(tokenizer) and data.tokenizer_path == str(tmp_path / "tok")
    train = data.split("train").contiguous(0, data.split("train").num_tokens)[0]
    first = train[:6].tolist()
    assert tokenizer.decode(first) and first == tokenizer(tokenizer.decode(first))["input_ids"][:6]
    assert (train == tokenizer.eos_token_id).sum() > 0  # documents separated by its EOS
    swap = with_model({"name": "hf", "pretrained": folders["mixtral"]}, [{"name": "topk", "k": 2}])
    assert any("set datasets[].tokenizer to the checkpoint" in w for w in parse_study(swap).warnings())
    swap["datasets"][0]["tokenizer"] = str(tmp_path / "tok")
    assert not any("tokenizer" in w for w in parse_study(swap).warnings())
    pairs = {**swap, "datasets": [{"name": "builtin:docstrings", "tokenizer": str(tmp_path / "tok")}]}
    assert "datasets[0]: tokenizer: summarization pairs are tokenized by a BPE" in problems(pairs)
