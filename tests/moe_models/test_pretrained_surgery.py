"""Our MoE layer inside transformers' own pretrained models (tiny checkpoints saved with save_pretrained, fp32):
a swapped-in topk router initialized from the checkpoint's gate reproduces the MoE checkpoint's logits; a
function-preserving upcycled dense checkpoint reproduces the dense model's logits; the other upcycling choices do
what they say; our llama exports to a checkpoint with our logits; LoRA trains adapters and routers only."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from moe_models.lora import LoRAOptions, apply_lora, parameter_counts
from moe_models.models.hf import HFCausalLM, HFOptions
from moe_models.models.llama import Llama, LlamaOptions
from moe_models.moe_ffn import MoEFeedForward, moe_forward
from moe_models.pretrained.export import export
from moe_models.pretrained.upcycle import UpcycleOptions
from moe_models.routers import ROUTERS
from moe_models.spec import RoutingSpec
from tests.hf_tiny import tiny_causal_lm

V, S = 96, 12


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {kind: tiny_causal_lm(kind, root / kind, vocab_size=V)
            for kind in ("gpt2", "llama", "qwen2", "mixtral", "qwen2_moe", "olmoe", "qwen3_moe", "deepseek_v3",
                         "glm4_moe", "gpt_oss")}


def topk(k: int, renormalize: bool) -> RoutingSpec:
    return RoutingSpec("topk", ROUTERS.get("topk").Options(k=k, renormalize=renormalize))


def reference_logits(folder: Path, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()(input_ids=ids).logits


def ids(seed: int = 0) -> torch.Tensor:
    return torch.randint(0, V, (2, S), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
@pytest.mark.parametrize("kind, renormalize", [("mixtral", True), ("qwen2_moe", False), ("olmoe", False),
                                               ("qwen3_moe", False)])
def test_swapped_topk_router_from_the_gate_reproduces_the_moe_checkpoint(checkpoints, kind, renormalize, backend):
    model = HFCausalLM(HFOptions(pretrained=str(checkpoints[kind]), init_router="pretrained", dispatch=backend),
                       topk(2, renormalize), V, 64, seed=0).eval()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == 2  # every MoE block swapped; attention, norms and embeddings are transformers' own
    with torch.no_grad():
        ours, aux = model.logits(ids())
    assert sorted(aux) == [0, 1]
    torch.testing.assert_close(ours, reference_logits(checkpoints[kind], ids()), atol=2e-5, rtol=2e-5)


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
@pytest.mark.parametrize("kind, scaling", [("deepseek_v3", 2.5), ("glm4_moe", 1.8)])
def test_deepseek_v3s_router_swapped_in_from_its_gate_reproduces_the_checkpoint(checkpoints, kind, scaling, backend):
    """Sigmoid scores, the checkpoint's selection-only correction bias, 2 of 4 expert groups, the routed scaling
    factor, ungated shared experts, a dense first layer left as it is."""
    routing = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2, score="sigmoid", n_group=4, topk_group=2,
                                                              routed_scaling_factor=scaling, renormalize=True))
    model = HFCausalLM(HFOptions(pretrained=str(checkpoints[kind]), init_router="pretrained", dispatch=backend),
                       routing, V, 64, seed=0).eval()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == 2 and all(layer.router.selection_bias for layer in layers)
    with torch.no_grad():
        ours, aux = model.logits(ids())
    assert sorted(aux) == [1, 2]  # layer 0 is dense
    torch.testing.assert_close(ours, reference_logits(checkpoints[kind], ids()), atol=2e-5, rtol=2e-5)
    # Each piece matters: without the group limit, or without the bias, the function changes.
    for changed in ({"n_group": 1, "topk_group": None}, {"routed_scaling_factor": 1.0}):
        other = RoutingSpec("topk", routing.options.model_copy(update=changed))
        with torch.no_grad():
            logits = HFCausalLM(HFOptions(pretrained=str(checkpoints[kind]), init_router="pretrained",
                                          dispatch=backend), other, V, 64, seed=0).eval().logits(ids())[0]
        assert not torch.allclose(logits, ours, atol=1e-3), changed


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_gpt_osss_router_swapped_in_from_its_gate_reproduces_the_checkpoint(checkpoints, backend):
    """A learned logit bias with a softmax over the top-k logits, clamped-SwiGLU experts with biases (gate and up
    interleaved in the checkpoint), attention sinks and sliding windows left to transformers."""
    routing = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2, router_bias=True, renormalize=True))
    model = HFCausalLM(HFOptions(pretrained=str(checkpoints["gpt_oss"]), init_router="pretrained", dispatch=backend),
                       routing, V, 64, seed=0).eval()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert len(layers) == 2 and all(layer.dispatch.spec.activation == "clamped_swiglu" for layer in layers)
    with torch.no_grad():
        ours, _ = model.logits(ids())
    torch.testing.assert_close(ours, reference_logits(checkpoints["gpt_oss"], ids()), atol=2e-5, rtol=2e-5)
    without_bias = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2, renormalize=True))
    with pytest.raises(ValueError, match="router_bias: true"):
        HFCausalLM(HFOptions(pretrained=str(checkpoints["gpt_oss"]), init_router="pretrained", dispatch=backend),
                   without_bias, V, 64, seed=0)


def test_a_fresh_router_changes_the_function_and_every_router_runs_swapped_in(checkpoints):
    reference = reference_logits(checkpoints["mixtral"], ids())
    for name in ROUTERS.names():
        if not ROUTERS.get(name).causal:
            continue  # expert choice: non-causal, refused in a decoder unless the study allows it
        routing = RoutingSpec(name, ROUTERS.get(name).Options())
        model = HFCausalLM(HFOptions(pretrained=str(checkpoints["mixtral"])), routing, V, 64, seed=0,
                           num_domains=3).eval()
        domains = torch.randint(0, 3, (2, S))
        with torch.no_grad():
            logits, aux = model.logits(ids(), domains)
        assert torch.isfinite(logits).all() and sorted(aux) == [0, 1], name
        assert not torch.allclose(logits, reference, atol=1e-3), name  # a new router routes differently
        assert aux[0].expert_mask_TE.shape == (2 * S, 4), name


@pytest.mark.parametrize("kind", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("granularity, k", [(1, 2), (2, 4)])
def test_function_preserving_upcycling_matches_the_dense_model_at_step_zero(checkpoints, kind, granularity, k):
    up = UpcycleOptions(num_experts=8, granularity=granularity, scaling="preserve")
    model = HFCausalLM(HFOptions(pretrained=str(checkpoints[kind]), upcycle=up), topk(k, True), V, 64, seed=3).eval()
    assert sum(isinstance(m, MoEFeedForward) for m in model.modules()) == 2
    with torch.no_grad():
        ours, aux = model.logits(ids(1))
    assert (aux[0].expert_mask_TE.sum(-1) == k).all()
    torch.testing.assert_close(ours, reference_logits(checkpoints[kind], ids(1)), atol=2e-5, rtol=2e-5)


def upcycled_layer(folder: Path, up: UpcycleOptions, routing: RoutingSpec) -> tuple[MoEFeedForward, torch.nn.Module]:
    dense = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    model = HFCausalLM(HFOptions(pretrained=str(folder), upcycle=up), routing, V, 64, seed=0)
    layers = dense.get_submodule("transformer.h" if hasattr(dense, "transformer") else "model.layers")
    return model.hf.get_submodule(
        "transformer.h.0.mlp" if hasattr(dense, "transformer") else "model.layers.0.mlp"), layers[0].mlp


@pytest.mark.parametrize("kind", ["gpt2", "llama"])
def test_divide_scaling_gives_the_dense_output_over_the_number_of_experts(checkpoints, kind):
    moe, mlp = upcycled_layer(checkpoints[kind], UpcycleOptions(num_experts=4, scaling="divide"), topk(2, True))
    x = torch.randn(1, 7, 32)
    with torch.no_grad():
        y, _ = moe_forward(moe.eval(), x, torch.zeros(1, 7, dtype=torch.long))
        torch.testing.assert_close(y, mlp(x) / 4, atol=1e-5, rtol=1e-5)


def test_drop_upcycling_redraws_that_fraction_of_each_experts_hidden_units_and_noise_separates_copies(checkpoints):
    moe, mlp = upcycled_layer(checkpoints["llama"], UpcycleOptions(num_experts=4, drop_fraction=0.25),
                              topk(2, True))
    experts = moe.dispatch.moe.deepspeed_moe.experts  # stacked (E, 2F, D): [gate; up]
    gate = mlp.gate_proj.weight.detach()  # (F, D) = (48, 32)
    kept = [(experts.up_weight_EFD.detach()[e, :48] == gate).all(-1) for e in range(4)]
    assert [int((~k).sum()) for k in kept] == [12] * 4  # 25% of 48 hidden units re-drawn, per expert
    assert len({tuple(k.tolist()) for k in kept}) > 1  # each expert re-draws its own units
    noisy, _ = upcycled_layer(checkpoints["llama"], UpcycleOptions(num_experts=4, noise=0.01), topk(2, True))
    w = noisy.dispatch.moe.deepspeed_moe.experts.up_weight_EFD.detach()
    assert not torch.equal(w[0], w[1])
    assert (w[0, :48] - gate).std() / gate.std() == pytest.approx(0.01, rel=0.2)


@pytest.mark.parametrize("routing", [RoutingSpec("dense", None, dense_active_experts=2), topk(2, True)],
                         ids=["dense->llama", "topk->mixtral"])
@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_our_llama_exports_to_a_checkpoint_with_our_logits(tmp_path, routing, backend):
    opts = LlamaOptions(d_model=32, n_heads=4, n_kv_heads=2, num_experts=4, expert_hidden=24, dispatch=backend)
    ours = Llama(opts, routing, V, 64, seed=0).eval()
    export(ours, routing, V, 64, tmp_path)
    x = ids(2)
    with torch.no_grad():
        expected = ours(x, x).lm_loss
        logits = AutoModelForCausalLM.from_pretrained(tmp_path, dtype=torch.float32).eval()(input_ids=x).logits
    loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), x.flatten())
    torch.testing.assert_close(loss, expected, atol=1e-5, rtol=1e-5)


def test_lora_trains_adapters_and_routers_only_and_starts_as_the_swapped_model(checkpoints):
    model = HFCausalLM(HFOptions(pretrained=str(checkpoints["mixtral"]), init_router="pretrained"),
                       topk(2, True), V, 64, seed=0)
    with torch.no_grad():
        before, _ = model.eval().logits(ids())
    apply_lora(model, LoRAOptions(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n or ".router." in n for n in trainable)
    assert any(".router." in n for n in trainable) and any("q_proj.lora_A" in n for n in trainable)
    with torch.no_grad():
        after, _ = model.eval().logits(ids())
    torch.testing.assert_close(after, before)  # LoRA's B starts at zero
    counts = parameter_counts(model)
    assert counts.trainable == sum(p.numel() for p in model.parameters() if p.requires_grad) < counts.total
    model.train()(ids(), ids()).loss.backward()
    frozen = dict(model.named_parameters())["hf.model.layers.0.self_attn.q_proj.base_layer.weight"]
    assert frozen.grad is None
    assert all(p.grad is not None for n, p in model.named_parameters() if "lora_B" in n)


def test_a_bf16_checkpoint_in_shards_loads_in_bf16_with_the_routers_in_fp32(checkpoints, tmp_path):
    """A bf16 cell loads the checkpoint as bf16 (no fp32 copy of the model); the swapped layers' experts follow it,
    their routers stay fp32, and the logits are transformers' own bf16 model's."""
    folder = tmp_path / "mixtral-bf16"
    AutoModelForCausalLM.from_pretrained(checkpoints["mixtral"], dtype=torch.float32).to(torch.bfloat16).save_pretrained(
        folder, max_shard_size="8KB")
    assert len(list(folder.glob("*.safetensors"))) >= 3  # sharded, as real checkpoints are
    model = HFCausalLM(HFOptions(pretrained=str(folder), init_router="pretrained"), topk(2, True), V, 64, seed=0,
                       dtype=torch.bfloat16).eval()
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert {p.dtype for layer in layers for p in layer.dispatch.parameters()} == {torch.bfloat16}
    assert {p.dtype for layer in layers for p in layer.router.parameters()} == {torch.float32}
    assert model.hf.model.embed_tokens.weight.dtype == torch.bfloat16
    with torch.no_grad():
        ours = model.logits(ids())[0].float()
        reference = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.bfloat16).eval()(input_ids=ids()).logits
    torch.testing.assert_close(ours, reference.float(), atol=0.05, rtol=0.05)
