"""Latent MoE (Nemotron 3; Megatron-Core's moe_latent_size): routed experts at a smaller width between a shared
down- and up-projection; the router and shared experts at the model's width. Its cost counts the experts at the
latent width plus the two projections."""
import pytest
import torch
from pydantic import ValidationError

from moe_models.cost import dense_forward_flops_per_token, expert_forward_flops_per_route
from moe_models.models import MODELS
from moe_models.moe_ffn import MoEFeedForward, moe_forward
from moe_models.routers.options import TopKOptions
from moe_models.spec import RoutingSpec

D, L, V = 32, 8, 50
ROUTING = RoutingSpec("topk", TopKOptions(k=2), {})


def gpt(**options):
    family = MODELS.get("gpt")
    return family.build(family.Options(d_model=D, n_layers=2, n_heads=2, num_experts=4, expert_hidden=16,
                                       **options), ROUTING, V, 16, 0)


@pytest.mark.parametrize("dispatch", ["grouped", "deepspeed"])
def test_experts_run_at_the_latent_width_between_the_shared_projections(dispatch):
    layer = next(m for m in gpt(moe_latent_size=L, dispatch=dispatch).modules() if isinstance(m, MoEFeedForward))
    layer.eval()
    assert layer.router.ctx.d_model == D and layer.dispatch.spec.d_model == L
    x, ids = torch.randn(2, 6, D), torch.randint(V, (2, 6))
    y, _ = moe_forward(layer, x, ids)
    x_TD = x.reshape(-1, D)
    decision = layer.router(x_TD, ids.reshape(-1))
    z_TL = layer.latent_down(x_TD)
    expected = torch.zeros(x_TD.shape[0], L)
    for k in range(decision.expert_ids_TK.shape[1]):  # each slot's expert alone, with its gate weight
        for e in range(4):
            rows = decision.expert_ids_TK[:, k] == e
            one = torch.nn.functional.one_hot(torch.full((int(rows.sum()), 1), e), 4).squeeze(1).float()
            if rows.any():
                single = type(decision)(torch.full((int(rows.sum()), 1), e), torch.ones(int(rows.sum()), 1),
                                        torch.ones(int(rows.sum()), 1, dtype=torch.bool), one, all_active=True)
                expected[rows] += decision.weights_TK[rows, k, None] * layer.dispatch(z_TL[rows], single).y_TD
    torch.testing.assert_close(y.reshape(-1, D), layer.latent_up(expected), rtol=1e-5, atol=1e-6)


def test_the_cost_counts_experts_at_the_latent_width_and_both_projections():
    full, latent = gpt(), gpt(moe_latent_size=L)
    layer_full = next(m for m in full.modules() if isinstance(m, MoEFeedForward))
    layer_latent = next(m for m in latent.modules() if isinstance(m, MoEFeedForward))
    assert expert_forward_flops_per_route(layer_latent) == expert_forward_flops_per_route(layer_full) * L / D
    projections = 2 * (2 * D * L) * 2  # down and up, 2 FLOPs per multiply-add, in each of the 2 MoE blocks
    assert dense_forward_flops_per_token(latent, 16) - dense_forward_flops_per_token(full, 16) == projections
    ids = torch.randint(V, (2, 16))
    latent(ids, ids).lm_loss.backward()  # it trains: every projection gets a gradient
    assert layer_latent.latent_down.weight.grad.abs().sum() > 0 and layer_latent.latent_up.weight.grad.abs().sum() > 0


def test_a_latent_width_at_the_model_width_is_refused():
    with pytest.raises(ValidationError, match="moe_latent_size=32 must be below d_model=32"):
        MODELS.get("gpt").Options(d_model=D, moe_latent_size=D)
