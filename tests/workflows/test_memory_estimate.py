"""Validation's memory estimate for pretrained (`hf`) models (issue 38): the parameter count from config.json alone
equals the model a cell builds on the checkpoint (router swap and upcycling, split into routed experts and the
rest); the bytes per rank follow ZeRO's accounting by hand; `moelab validate` prints the estimate and warns, naming
the model and the field, when it exceeds resources.memory_per_worker_gb."""
from __future__ import annotations

import json

import pytest
import yaml

from moe_models.models.hf import HFCausalLM, HFOptions
from moe_models.models.options import UpcycleOptions
from moe_models.routers import ROUTERS
from moe_models.spec import RoutingSpec
from tests.hf_tiny import tiny_causal_lm
from workflows.driver.cli import main
from workflows.study.memory import GiB, ParamCount, checkpoint_parameters, rank_memory

V = 320  # at least the smallest BPE a study may train (260), so a study can use these checkpoints
TOP2 = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("memory")
    return {kind: tiny_causal_lm(kind, root / kind, vocab_size=V)
            for kind in ("llama", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3", "glm4_moe")}


def built(folder, upcycle=None) -> ParamCount:
    """What a cell trains: our HFCausalLM on the checkpoint, its routed experts being the dispatch modules'."""
    model = HFCausalLM(HFOptions(pretrained=str(folder), upcycle=upcycle), TOP2, V, 32, seed=0)
    experts = sum(p.numel() for name, p in model.named_parameters() if ".dispatch." in name)
    moe_layers = {name.split(".dispatch.")[0] for name, _ in model.named_parameters() if ".dispatch." in name}
    swapped = upcycle is None  # router swap reads a rank's experts only; upcycling reads the dense checkpoint whole
    return ParamCount(sum(p.numel() for p in model.parameters()) - experts, experts,
                      len(moe_layers) if swapped else 1, reads_own_experts=swapped)


@pytest.mark.parametrize("kind", ["mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3", "glm4_moe"])
def test_the_count_from_config_json_is_the_router_swapped_model(checkpoints, kind):
    config = json.loads((checkpoints[kind] / "config.json").read_text())
    assert checkpoint_parameters(config) == built(checkpoints[kind])


def test_routed_experts_are_counted_by_hand_and_shared_experts_are_not(checkpoints):
    config = json.loads((checkpoints["qwen2_moe"] / "config.json").read_text())
    # 2 layers x 4 experts x (gate, up, down) of 32 x 24; the shared expert (intermediate 40) is not routed
    assert checkpoint_parameters(config).experts == 2 * 4 * 3 * 32 * 24


@pytest.mark.parametrize("upcycle", [UpcycleOptions(num_experts=4), UpcycleOptions(num_experts=4, moe_every=2),
                                     UpcycleOptions(num_experts=4, granularity=2)], ids=["every", "every-2", "g2"])
def test_the_count_of_an_upcycled_dense_checkpoint_is_the_upcycled_model(checkpoints, upcycle):
    config = json.loads((checkpoints["llama"] / "config.json").read_text())
    estimate = checkpoint_parameters(config, upcycle)
    assert estimate == built(checkpoints["llama"], upcycle)
    mlp = 3 * 32 * 48  # the tiny llama's gate, up and down
    blocks = [b for b in range(2) if upcycle.is_moe_layer(b)]
    assert estimate.experts == len(blocks) * 4 * mlp // upcycle.granularity


def test_bytes_per_rank_follow_zeros_accounting():
    params = ParamCount(dense=1000, experts=8000)  # 4 workers, 2 expert-parallel ranks: 4000 experts each
    zero1 = rank_memory(params, "bf16", zero_stage=1, workers=4, ep_size=2)
    assert zero1.weights == 2 * 5000 and zero1.gradients == 2 * 5000
    assert zero1.optimizer == 12 * (1000 / 4 + 4000 / 2)  # dense over 4 data-parallel ranks, experts over 2
    assert zero1.load_peak == 2 * 9000  # read whole (an upcycled dense checkpoint)
    zero2 = rank_memory(params, "bf16", zero_stage=2, workers=4, ep_size=2)
    assert zero2.gradients == 2 * (1000 / 4 + 4000 / 2) and zero2.optimizer == zero1.optimizer
    fp32 = rank_memory(params, "fp32", zero_stage=0, workers=4, ep_size=1)
    assert (fp32.weights, fp32.gradients, fp32.optimizer) == (4 * 9000, 4 * 9000, 8 * 9000)
    adapters = rank_memory(params, "bf16", zero_stage=0, workers=1, ep_size=1, train_dense=False, train_experts=False)
    assert adapters.gradients == adapters.optimizer == 0 and adapters.weights == 2 * 9000
    experts_too = rank_memory(params, "bf16", zero_stage=0, workers=1, ep_size=1, train_dense=False)
    assert experts_too.optimizer == 12 * 8000


def test_expert_parallelism_divides_only_the_experts():
    params = ParamCount(dense=1000, experts=8000)
    one, four = (rank_memory(params, "bf16", 0, workers=4, ep_size=ep) for ep in (1, 4))
    assert one.weights - four.weights == 2 * (8000 - 2000)
    assert one.load_peak == four.load_peak  # read whole on every rank


def test_a_swapped_checkpoint_loads_only_the_ranks_experts():
    """Router swap reads a rank's experts only; one MoE layer's of them is built in fp32 before its cast."""
    params = ParamCount(dense=1000, experts=8000, moe_layers=2, reads_own_experts=True)
    one, four = (rank_memory(params, "bf16", 0, workers=4, ep_size=ep) for ep in (1, 4))
    assert one.load_peak == 2 * 9000 + 4 * 8000 / 2
    assert four.load_peak == 2 * (1000 + 2000) + 4 * 2000 / 2


def study(folder, **resources) -> dict:
    return {"name": "memory", "routers": [{"name": "topk", "k": 2}],
            "models": [{"name": "hf", "label": "tiny-mixtral", "pretrained": str(folder)}],
            "datasets": [{"name": "builtin:domains", "vocab_size": V}],
            "training": {"precision": "bf16", "zero_stage": 1},
            "resources": {"workers_per_cell": 2, **resources}}


def validate(tmp_path, raw: dict, capsys) -> tuple[int, str, str]:
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(raw))
    code = main(["validate", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_validate_prints_the_estimate_and_warns_past_the_workers_memory(checkpoints, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = json.loads((checkpoints["mixtral"] / "config.json").read_text())
    expected = rank_memory(checkpoint_parameters(config), "bf16", 1, 2, 1)
    code, out, err = validate(tmp_path, study(checkpoints["mixtral"]), capsys)
    assert code == 0 and f"models[0] (tiny-mixtral): {expected.describe()}" in out
    assert "memory_per_worker_gb" not in err  # nothing to compare with: no warning
    small = expected.steady / GiB / 2
    code, _, err = validate(tmp_path, study(checkpoints["mixtral"], memory_per_worker_gb=small), capsys)
    assert code == 0 and "models[0] (tiny-mixtral): about" in err and f"memory_per_worker_gb={small:g}" in err
    code, _, err = validate(tmp_path, study(checkpoints["mixtral"], memory_per_worker_gb=1.0), capsys)
    assert "memory_per_worker_gb" not in err


def test_a_checkpoint_of_the_reports_size_is_counted_from_its_config_alone():
    """Report 002's router-swap target, Qwen1.5-MoE-A2.7B (its published config): 14.3B parameters, 57 GB in fp32,
    counted on the meta device without a byte of its weights."""
    from transformers import Qwen2MoeConfig

    config = Qwen2MoeConfig(vocab_size=151936, hidden_size=2048, intermediate_size=5632, num_hidden_layers=24,
                            num_attention_heads=16, num_key_value_heads=16, moe_intermediate_size=1408,
                            shared_expert_intermediate_size=5632, num_experts=60, num_experts_per_tok=4,
                            max_position_embeddings=8192, tie_word_embeddings=False).to_dict()
    params = checkpoint_parameters(config)
    assert params.total == pytest.approx(14.3e9, rel=0.005)
    assert params.experts == 24 * 60 * 3 * 2048 * 1408
    assert params.moe_layers == 24 and params.reads_own_experts
    assert rank_memory(params, "fp32", 0, 1, 1).weights == pytest.approx(57.3e9, rel=0.005)
    # bf16 on 8 workers, ZeRO-1, 8 expert-parallel ranks: the experts' weights split 8 ways
    spread = rank_memory(params, "bf16", 1, 8, 8)
    assert spread.weights == 2 * (params.dense + params.experts // 8)
