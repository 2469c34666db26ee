"""Matched compute while training: a dynamic router with `target_experts_per_token` trains to spend that many experts
per token (each router, two targets), its knob is saved and restored with the checkpoint, stays fp32, is decided by
every rank's tokens alike, and a router without a target is exactly what it was."""
from __future__ import annotations

import copy
import re

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_models.moe_ffn import moe_forward
from moe_models.optimizer_hooks import after_optimizer_step
from tests.moe_models.test_balancing_scope import free_port
from tests.tiny_layers import tiny_moe

TOKENS, D, E = 512, 8, 4
ROUTERS = {"top_p": {"p": 0.4}, "top_any": {}, "entropy_adaptive": {"min_k": 1, "max_k": 4}}


def clustered_batch(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Four token clusters, each with its own regression target: a router that learns them is confident on some
    tokens and not on others, as a trained model's is (tests/moe_models/test_calibration.py)."""
    gen = torch.Generator().manual_seed(seed)
    centers = torch.randn(4, D, generator=gen) * 3
    cluster = torch.randint(0, 4, (TOKENS,), generator=gen)
    x = (centers[cluster] + 0.8 * torch.randn(TOKENS, D, generator=gen)).unsqueeze(0)
    return x, torch.randn(4, D, generator=gen)[cluster].unsqueeze(0)


def train(layer, steps: int = 150, lr: float = 0.01) -> list[float]:
    """Experts per token at each training step."""
    x, target = clustered_batch()
    ids = torch.zeros(1, TOKENS, dtype=torch.long)
    optimizer = torch.optim.Adam(layer.parameters(), lr=lr)
    spent = []
    for _ in range(steps):
        optimizer.zero_grad()
        y, _ = moe_forward(layer, x, ids)
        ((y - target) ** 2).mean().backward()
        optimizer.step()
        counted = getattr(layer.router, "routes_this_step", None)  # a router with a target counts its routes
        if counted is not None:
            spent.append(counted.item() / TOKENS)
        after_optimizer_step(layer)
    return spent


def experts_per_token(layer) -> float:
    x, _ = clustered_batch()
    with torch.no_grad():
        decision = layer.router.eval()(x.reshape(-1, D), torch.zeros(TOKENS, dtype=torch.long))
    layer.router.train()
    return decision.experts_per_token_T.float().mean().item()


@pytest.mark.parametrize("router", list(ROUTERS))
@pytest.mark.parametrize("target", [1.5, 3.0])
def test_a_router_trains_to_its_target_experts_per_token(router, target):
    layer = tiny_moe(router, {**ROUTERS[router], "target_experts_per_token": target}, d_model=D, num_experts=E)
    knob = layer.router.Options.calibration_knob
    spent = train(layer)
    assert abs(sum(spent[-20:]) / 20 - target) <= 0.1, (router, target, spent[::15])  # while training
    assert abs(experts_per_token(layer) - target) <= 0.1  # and evaluated with the knob it reached
    assert getattr(layer.router.options, knob.option) == layer.router.knob_value.item()
    assert knob.low <= layer.router.knob_value.item() <= knob.high


def test_the_knob_moves_toward_more_experts_when_it_spends_too_few_and_back():
    """One step's update, by hand: a = a + rate * (target - measured), in the knob's axis."""
    layer = tiny_moe("top_p", {"p": 0.4, "target_experts_per_token": 2.0, "target_rate": 0.1}, d_model=D,
                     num_experts=E)
    router = layer.router
    router.routes_this_step.fill_(1.5 * TOKENS)
    router.tokens_this_step.fill_(TOKENS)
    after_optimizer_step(layer)
    assert router.options.p == pytest.approx(0.4 + 0.1 * 0.5) and router.routes_this_step.item() == 0
    after_optimizer_step(layer)  # a step without a training forward leaves it
    assert router.options.p == pytest.approx(0.45)
    router.routes_this_step.fill_(3.0 * TOKENS)
    router.tokens_this_step.fill_(TOKENS)
    after_optimizer_step(layer)
    assert router.options.p == pytest.approx(0.45 - 0.1)
    scaled = tiny_moe("entropy_adaptive", {"min_k": 1, "max_k": 4, "target_experts_per_token": 2.0,
                                           "target_rate": 0.1}, d_model=D, num_experts=E).router
    scaled.routes_this_step.fill_(1.0 * TOKENS)
    scaled.tokens_this_step.fill_(TOKENS)
    after_optimizer_step(scaled)
    assert scaled.options.entropy_scale == pytest.approx(torch.tensor(0.1).exp().item())  # log axis
    fewer_when_higher = tiny_moe("top_any", {"target_experts_per_token": 2.0, "target_rate": 0.1}, d_model=D,
                                 num_experts=E).router
    fewer_when_higher.routes_this_step.fill_(1.0 * TOKENS)
    fewer_when_higher.tokens_this_step.fill_(TOKENS)
    after_optimizer_step(fewer_when_higher)
    assert fewer_when_higher.options.threshold_offset == pytest.approx(-0.1)  # a lower threshold passes more


def test_the_knob_is_saved_with_the_checkpoint_and_the_loaded_router_routes_with_it():
    options = {"p": 0.4, "target_experts_per_token": 3.0}
    trained = tiny_moe("top_p", options, d_model=D, num_experts=E)
    train(trained, steps=30)
    state = copy.deepcopy(trained.state_dict())
    assert "router.knob_value" in state and state["router.knob_value"].item() != 0.4
    fresh = tiny_moe("top_p", options, d_model=D, num_experts=E, seed=1)
    fresh.load_state_dict(state)
    assert fresh.router.options.p == trained.router.options.p == state["router.knob_value"].item()
    assert experts_per_token(fresh) == experts_per_token(trained)


def test_without_a_target_the_router_and_its_checkpoint_are_unchanged():
    layer = tiny_moe("top_p", {"p": 0.4}, d_model=D, num_experts=E)
    assert list(layer.router.state_dict()) == ["proj.weight"] and not layer.router._forward_hooks
    train(layer, steps=5)
    assert layer.router.options.p == 0.4


def test_the_knob_stays_fp32_when_the_model_is_cast_to_bf16():
    layer = tiny_moe("top_p", {"p": 0.3, "target_experts_per_token": 2.0}, d_model=D, num_experts=E).bfloat16()
    assert layer.router.knob_value.dtype == torch.float32 and layer.router.proj.weight.dtype == torch.bfloat16
    assert layer.router.knob_value.item() == pytest.approx(0.3, abs=1e-7)  # bf16 would hold 0.30078125


def test_a_target_the_router_cannot_spend_is_refused_naming_the_option():
    from workflows.study.errors import StudyError
    from workflows.study.loading import parse_study

    study = {"name": "t", "seeds": [0], "routers": [{"name": "top_p", "p": 0.4, "max_k": 2,
                                                     "target_experts_per_token": 3}],
             "models": [{"name": "gpt", "num_experts": 4}], "datasets": [{"name": "builtin:domains"}]}
    with pytest.raises(StudyError, match=re.escape("target_experts_per_token: must lie in [1, 2]")):
        parse_study(study)


def two_rank_layer():
    """A top-p router sure of expert 0 where feature 0 is large (one expert per token), unsure where it is 0 (all four
    experts score alike: two of them reach p = 0.4): rank 0's tokens spend 1 expert, rank 1's 2, both together 1.5."""
    layer = tiny_moe("top_p", {"p": 0.4, "target_experts_per_token": 2.0}, d_model=D, num_experts=E).train()
    with torch.no_grad():
        layer.router.proj.weight.zero_()
        layer.router.proj.weight[0, 0] = 1.0
    return layer


def rank_batch(rank: int) -> torch.Tensor:
    x = torch.zeros(1, TOKENS, D)
    x[..., 0] = 10.0 if rank == 0 else 0.0
    return x


def two_rank_worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    try:
        layer = two_rank_layer()
        moe_forward(layer, rank_batch(rank), torch.zeros(1, TOKENS, dtype=torch.long))
        after_optimizer_step(layer)
        results[rank] = layer.router.options.p
    finally:
        dist.destroy_process_group()


def test_every_rank_moves_its_knob_by_the_whole_batch():
    """Two data-parallel ranks, each with its own tokens, end the step with the knob one process gets from both."""
    results = mp.Manager().dict()
    mp.spawn(two_rank_worker, args=(free_port(), results), nprocs=2, join=True)
    single = two_rank_layer()
    moe_forward(single, torch.cat([rank_batch(0), rank_batch(1)], dim=1), torch.zeros(1, 2 * TOKENS,
                                                                                      dtype=torch.long))
    after_optimizer_step(single)
    assert results[0] == results[1] == pytest.approx(0.4 + 0.1 * (2.0 - 1.5))  # not 1.0 (rank 0) nor 0 (rank 1)
    assert single.router.options.p == pytest.approx(results[0])
