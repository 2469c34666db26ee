"""Model FLOPs per token at known points, and the equal-active-FLOPs invariant between an MoE and its dense twin."""
import pytest
import torch

from moe_models.cost import dense_forward_flops_per_token, expert_forward_flops_per_route, training_flops_per_token
from moe_models.models.gpt import GPT, GPTOptions
from moe_models.moe_ffn import MoEFeedForward
from moe_models.routers import ROUTERS
from moe_models.spec import DENSE, RoutingSpec

D, H, E, F, V, S, L, K = 16, 2, 4, 32, 50, 8, 2, 2


def gpt(routing: RoutingSpec, **extra) -> GPT:
    opts = GPTOptions(d_model=D, n_heads=H, num_experts=E, expert_hidden=F, n_layers=L, **extra)
    return GPT(opts, routing, V, S, seed=0)


def test_dense_part_counts_attention_projections_router_head_and_attention_at_a_known_point():
    model = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K)))
    per_block = 2 * D * 3 * D + 2 * D * D + 2 * D * E  # qkv, out, router
    attention = 2 * 2 * S * D  # QK^T and AV, per token
    assert dense_forward_flops_per_token(model, S) == L * (per_block + attention) + 2 * D * V  # + tied LM head
    layer = next(m for m in model.modules() if isinstance(m, MoEFeedForward))
    assert expert_forward_flops_per_route(layer) == 4 * D * F


def test_moe_with_k_experts_per_token_costs_its_dense_twin_plus_the_router():
    moe = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K)))
    dense = gpt(RoutingSpec(DENSE, dense_active_experts=K))
    expert_flops = L * K * 4 * D * F  # every token through K experts in each of the L MoE layers
    moe_flops = training_flops_per_token(moe, S, expert_flops)
    dense_flops = training_flops_per_token(dense, S, 0.0)  # its FFNs (hidden K*F) are plain linears
    assert moe_flops - dense_flops == pytest.approx(3 * L * 2 * D * E)  # only the routers differ


def test_served_routes_from_evaluation_match_the_architecture_count():
    model = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K))).eval()
    ids = torch.randint(V, (2, S))
    out = model(ids, ids)
    measured = sum(float(aux.sums["expert_flops"]) / ids.numel() for aux in out.moe.values())
    assert measured == pytest.approx(L * K * 4 * D * F)


SWIGLU_SHARED = {"expert_activation": "swiglu", "num_shared_experts": 1, "shared_expert_gate": True}


def test_swiglu_experts_cost_three_matmuls_and_shared_experts_count_for_every_token():
    """A SwiGLU expert is three D x F matmuls (gate, up, down); the shared expert and its gate run for every token, so
    they count with the dense linears, and the routed experts with the served routes."""
    moe = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K)), **SWIGLU_SHARED)
    layer = next(m for m in moe.modules() if isinstance(m, MoEFeedForward))
    assert expert_forward_flops_per_route(layer) == 6 * D * F
    plain = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K)), expert_activation="swiglu")
    shared_per_block = 6 * D * F + 2 * D  # one shared expert of width F, plus its gate (D -> 1)
    assert dense_forward_flops_per_token(moe, S) - dense_forward_flops_per_token(plain, S) == L * shared_per_block
    ids = torch.randint(V, (2, S))
    out = moe.eval()(ids, ids)
    measured = sum(float(aux.sums["expert_flops"]) / ids.numel() for aux in out.moe.values())
    assert measured == pytest.approx(L * K * 6 * D * F)  # routed experts only


def test_the_equal_active_flops_dense_twin_includes_the_shared_experts():
    moe = gpt(RoutingSpec("topk", ROUTERS.get("topk").Options(k=K)), **SWIGLU_SHARED)
    dense = gpt(RoutingSpec(DENSE, dense_active_experts=K), **SWIGLU_SHARED)
    assert all(block.ffn.down.in_features == (K + 1) * F for block in dense.blocks)  # K routed + 1 shared
    moe_flops = training_flops_per_token(moe, S, L * K * 6 * D * F)
    dense_flops = training_flops_per_token(dense, S, 0.0)
    assert moe_flops - dense_flops == pytest.approx(3 * L * (2 * D * E + 2 * D))  # routers and the shared gate
