"""Our MoE block and llama block against transformers' own modules, given the same weights (fp32):
Mixtral's sparse MoE block (SwiGLU experts, top-2 renormalized), Qwen2-MoE's (plus a gated shared expert, with and
without norm_topk_prob) on both dispatch backends, forward and backward; and Llama's decoder layer with a dense FFN."""
from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, MixtralConfig, Qwen2MoeConfig
from transformers.models.llama.modeling_llama import LlamaDecoderLayer, LlamaRotaryEmbedding
from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
from transformers.models.qwen2_moe.modeling_qwen2_moe import Qwen2MoeSparseMoeBlock

from moe_models.experts import ExpertFFN
from moe_models.models.llama import Block, LlamaOptions, rotary_tables
from moe_models.moe_ffn import MoEFeedForward, moe_forward
from moe_models.pretrained.router_swap import LOCAL_EXPERTS as EXPERT_KEY  # both backends' per-expert layout
from moe_models.pretrained.router_swap import load_experts
from tests.tiny_layers import tiny_moe

D, F, E, K, T = 32, 24, 6, 2, 40


def our_moe(backend: str, renormalize: bool, shared: bool = False) -> MoEFeedForward:
    return tiny_moe("topk", {"k": K, "renormalize": renormalize}, d_model=D, expert_hidden=F, num_experts=E,
                    backend=backend, activation="swiglu", shared_experts=shared, seed=None)


def randomize(module: torch.nn.Module) -> None:
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn_like(p) * 0.2)


def stacked_grads(layer: MoEFeedForward) -> list[torch.Tensor]:
    """(gate_up, down) gradients of every expert, stacked as transformers stores them, whichever backend."""
    params = dict(layer.dispatch.named_parameters())
    if "moe.deepspeed_moe.experts.up_weight_EFD" in params:  # grouped: already stacked
        return [params["moe.deepspeed_moe.experts.up_weight_EFD"].grad,
                params["moe.deepspeed_moe.experts.down_weight_EDF"].grad]
    return [torch.stack([params[f"{EXPERT_KEY}.{e}.{name}.weight"].grad for e in range(E)]) for name in ("up", "down")]


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_swiglu_experts_equal_mixtral_sparse_moe_block(backend):
    torch.manual_seed(0)
    theirs = MixtralSparseMoeBlock(MixtralConfig(hidden_size=D, intermediate_size=F, num_local_experts=E,
                                                 num_experts_per_tok=K, router_jitter_noise=0.0))
    randomize(theirs)
    ours = our_moe(backend, renormalize=True)  # Mixtral renormalizes its top-2 weights
    with torch.no_grad():
        ours.router.proj.weight.copy_(theirs.gate.weight)
    load_experts(ours, theirs.experts.gate_up_proj.detach(), theirs.experts.down_proj.detach())
    x = torch.randn(1, T, D, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    y, _ = moe_forward(ours, x, torch.zeros(1, T, dtype=torch.long))
    y_theirs = theirs(x_theirs)
    torch.testing.assert_close(y, y_theirs, atol=1e-5, rtol=1e-5)
    upstream = torch.randn_like(y)
    (y * upstream).sum().backward()
    (y_theirs * upstream).sum().backward()
    torch.testing.assert_close(x.grad, x_theirs.grad, atol=1e-5, rtol=1e-5)
    gate_up_grad, down_grad = stacked_grads(ours)
    torch.testing.assert_close(gate_up_grad, theirs.experts.gate_up_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(down_grad, theirs.experts.down_proj.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.router.proj.weight.grad, theirs.gate.weight.grad, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("norm_topk_prob", [False, True])
@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_shared_expert_with_gate_equals_qwen2_moe_sparse_moe_block(backend, norm_topk_prob):
    torch.manual_seed(1)
    theirs = Qwen2MoeSparseMoeBlock(Qwen2MoeConfig(hidden_size=D, moe_intermediate_size=F, num_experts=E,
                                                   num_experts_per_tok=K, shared_expert_intermediate_size=F,
                                                   norm_topk_prob=norm_topk_prob))
    randomize(theirs)
    ours = our_moe(backend, renormalize=norm_topk_prob, shared=True)
    with torch.no_grad():
        ours.router.proj.weight.copy_(theirs.gate.weight)
        ours.shared_experts.up.weight.copy_(torch.cat([theirs.shared_expert.gate_proj.weight,
                                                       theirs.shared_expert.up_proj.weight]))
        ours.shared_experts.down.weight.copy_(theirs.shared_expert.down_proj.weight)
        ours.shared_expert_gate.weight.copy_(theirs.shared_expert_gate.weight)
    load_experts(ours, theirs.experts.gate_up_proj.detach(), theirs.experts.down_proj.detach())
    x = torch.randn(2, T // 2, D, requires_grad=True)
    x_theirs = x.detach().clone().requires_grad_()
    y, _ = moe_forward(ours, x, torch.zeros(2, T // 2, dtype=torch.long))
    y_theirs = theirs(x_theirs)
    torch.testing.assert_close(y, y_theirs, atol=1e-5, rtol=1e-5)
    (y.square().sum()).backward()
    (y_theirs.square().sum()).backward()
    torch.testing.assert_close(x.grad, x_theirs.grad, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.shared_expert_gate.weight.grad, theirs.shared_expert_gate.weight.grad,
                               atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(ours.shared_experts.down.weight.grad, theirs.shared_expert.down_proj.weight.grad,
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_llama_block_with_a_dense_ffn_equals_transformers_llama_decoder_layer(kv_heads):
    torch.manual_seed(2)
    config = LlamaConfig(hidden_size=D, intermediate_size=F, num_attention_heads=4, num_key_value_heads=kv_heads,
                         rms_norm_eps=1e-6, rope_theta=10_000.0, attention_dropout=0.0)
    config._attn_implementation = "sdpa"  # causal with no mask, as ours
    theirs = LlamaDecoderLayer(config, layer_idx=0)
    randomize(theirs)
    opts = LlamaOptions(d_model=D, n_heads=4, n_kv_heads=kv_heads, expert_hidden=F)
    ours = Block(opts, ExpertFFN(D, F, "swiglu"))
    with torch.no_grad():
        for norm in ("input_layernorm", "post_attention_layernorm"):
            getattr(ours, norm).weight.copy_(getattr(theirs, norm).weight)
        for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
            getattr(ours.self_attn, proj).weight.copy_(getattr(theirs.self_attn, proj).weight)
        ours.mlp.up.weight.copy_(torch.cat([theirs.mlp.gate_proj.weight, theirs.mlp.up_proj.weight]))
        ours.mlp.down.weight.copy_(theirs.mlp.down_proj.weight)
    x = torch.randn(2, 12, D)
    positions = torch.arange(12).unsqueeze(0).expand(2, -1)
    cos_theirs, sin_theirs = LlamaRotaryEmbedding(config)(x, positions)
    cos, sin = rotary_tables(12, D // 4, 10_000.0)
    torch.testing.assert_close(cos, cos_theirs[0], atol=1e-6, rtol=1e-6)
    y_theirs = theirs(x, position_embeddings=(cos_theirs, sin_theirs))
    y_theirs = y_theirs[0] if isinstance(y_theirs, tuple) else y_theirs
    y = ours(x, cos, sin)
    torch.testing.assert_close(y, y_theirs, atol=1e-5, rtol=1e-5)
