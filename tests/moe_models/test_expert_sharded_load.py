"""A swapped MoE checkpoint is loaded tensor by tensor, each expert-parallel rank reading only its own experts
(moe_models/pretrained/expert_sharded_load.py): shown by the names it reads, and by the tensors it ends up with being
transformers' own, bit for bit, on a bf16 checkpoint saved in four safetensors shards as real ones are."""
from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_models.models.hf import HFCausalLM
from moe_models.models.options import HFOptions
from moe_models.pretrained.expert_sharded_load import experts_modules, load_without_experts, still_on_meta
from moe_models.pretrained.router_swap import expert_weights
from moe_models.routers import ROUTERS
from moe_models.spec import RoutingSpec
from tests.hf_tiny import tiny_causal_lm

V = 96
EXPERT = re.compile(r"\.experts\.(\d+)\.")


def save_in_shards(source: Path, folder: Path, shards: int) -> Path:
    """The checkpoint re-saved in bf16, split into `shards` safetensors files."""
    model = AutoModelForCausalLM.from_pretrained(source, dtype=torch.bfloat16)
    total = sum(p.numel() * p.element_size() for p in model.state_dict().values())
    for size in range(total // shards, total, max(1, total // 200)):  # the largest tensor sets the granularity
        model.save_pretrained(folder, max_shard_size=size)
        if len(list(folder.glob("*.safetensors"))) == shards:
            return folder
        for f in folder.glob("*.safetensors"):
            f.unlink()
    raise AssertionError(f"no shard size splits the checkpoint into {shards} files")


@pytest.fixture(scope="module")
def qwen_shards(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("qwen2_moe")
    return save_in_shards(tiny_causal_lm("qwen2_moe", root / "fp32", vocab_size=V), root / "bf16", shards=4)


@pytest.mark.parametrize("ep_rank", [0, 1])
def test_a_rank_reads_its_experts_only_and_holds_the_checkpoints_tensors(qwen_shards, ep_rank):
    assert len(list(qwen_shards.glob("*.safetensors"))) == 4
    reference = AutoModelForCausalLM.from_pretrained(qwen_shards, dtype=torch.bfloat16)
    model, reader = load_without_experts(str(qwen_shards), torch.bfloat16)
    dense_reads = list(reader.tensors.reads)
    assert not any(EXPERT.search(name) for name in dense_reads)  # nothing of the experts before they are asked for
    assert len(dense_reads) == len(set(dense_reads))  # each tensor read once
    theirs = dict(experts_modules(reference))
    first, count = 2 * ep_rank, 2  # DeepSpeed's placement of 4 experts on 2 ranks
    for name, experts in experts_modules(model):
        layer = int(name.split(".")[2])
        ours = reader.experts(experts, layer, first, count)
        whole = expert_weights(theirs[name], layer)
        assert ours.first == first and ours.up_EXD.dtype == torch.bfloat16
        torch.testing.assert_close(ours.up_EXD, whole.up_EXD[first:first + count], rtol=0, atol=0)
        torch.testing.assert_close(ours.down_EDF, whole.down_EDF[first:first + count], rtol=0, atol=0)
    read = {int(m.group(1)) for name in reader.tensors.reads if (m := EXPERT.search(name))}
    assert read == {first, first + 1}
    assert reader.experts_read == 2 * 2  # two MoE layers, two experts each
    # Everything else is the checkpoint's own, at its dtype; only the experts are left to router swap.
    expected = reference.state_dict()
    loaded = model.state_dict()
    for key, value in loaded.items():
        if ".experts." not in key:
            assert value.dtype == expected[key].dtype, key
            torch.testing.assert_close(value, expected[key], rtol=0, atol=0)
    assert torch.equal(model.model.rotary_emb.inv_freq, reference.model.rotary_emb.inv_freq)  # not in the checkpoint
    assert {name.rsplit(".", 1)[0] for name in still_on_meta(model)} == {f"model.layers.{i}.mlp.experts"
                                                                         for i in range(2)}


def test_a_stacked_checkpoint_is_read_by_rows(tmp_path):
    """GPT-OSS stores each block's experts as stacked tensors: a rank reads its rows of them, nothing more."""
    folder = tiny_causal_lm("gpt_oss", tmp_path / "gpt_oss", vocab_size=V)
    reference = dict(experts_modules(AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)))
    model, reader = load_without_experts(str(folder), torch.float32)
    for name, experts in experts_modules(model):
        ours = reader.experts(experts, 0, 2, 2)
        whole = expert_weights(reference[name], 0)
        for got, want in [(ours.up_EXD, whole.up_EXD), (ours.down_EDF, whole.down_EDF),
                          (ours.up_bias_EF, whole.up_bias_EF), (ours.down_bias_ED, whole.down_bias_ED)]:
            torch.testing.assert_close(got, want[2:4], rtol=0, atol=0)
    expert_reads = [name for name in reader.tensors.reads if ".experts." in name]
    assert expert_reads and all(name.endswith("[2:4]") for name in expert_reads)


def test_the_swapped_model_loaded_whole_reports_every_expert_read(qwen_shards):
    model = HFCausalLM(HFOptions(pretrained=str(qwen_shards), init_router="pretrained"),
                       RoutingSpec("topk", ROUTERS.get("topk").Options(k=2)), V, 64, seed=0, dtype=torch.bfloat16)
    assert model.checkpoint_expert_share == 1.0
    assert {int(m.group(1)) for name in model.checkpoint_reads if (m := EXPERT.search(name))} == set(range(4))


def test_a_hub_name_in_the_local_cache_is_read_tensor_by_tensor(qwen_shards, tmp_path, monkeypatch):
    """A hub name is read from its snapshot in the Hugging Face cache (offline here, as on a node whose cache was
    filled beforehand), through the same per-tensor path as a local folder."""
    import shutil

    from huggingface_hub import constants

    repo, commit = tmp_path / "hub" / "models--someorg--tiny-qwen-moe", "0" * 40
    shutil.copytree(qwen_shards, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    model = HFCausalLM(HFOptions(pretrained="someorg/tiny-qwen-moe", init_router="pretrained"),
                       RoutingSpec("topk", ROUTERS.get("topk").Options(k=2)), V, 64, seed=0, dtype=torch.bfloat16)
    assert model.checkpoint_expert_share == 1.0 and model.checkpoint_reads  # not from_pretrained's whole load
    with torch.no_grad():
        ids = torch.randint(0, V, (2, 12), generator=torch.Generator().manual_seed(0))
        reference = AutoModelForCausalLM.from_pretrained(qwen_shards, dtype=torch.bfloat16).eval()
        torch.testing.assert_close(model.eval().logits(ids)[0].float(), reference(input_ids=ids).logits.float(),
                                   atol=0.05, rtol=0.05)


def test_a_checkpoint_missing_a_tensor_is_refused_naming_it(tmp_path):
    from safetensors.torch import load_file, save_file

    folder = tiny_causal_lm("qwen2_moe", tmp_path / "qwen", vocab_size=V)
    tensors = load_file(folder / "model.safetensors")
    del tensors["model.layers.1.self_attn.q_proj.weight"]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"no tensor for model\.layers\.1\.self_attn\.q_proj\.weight"):
        load_without_experts(str(folder), torch.float32)
