"""Property tests over every registered router: the contract every dispatch backend relies on."""
import pytest
import torch

from moe_models.routers import ROUTERS, RouterContext

E, D, V, T = 6, 16, 50, 64


def make(name: str, **options):
    cls = ROUTERS.get(name)
    return cls(RouterContext(d_model=D, num_experts=E, vocab_size=V, layer_index=1, seed=3), cls.Options(**options))


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=gen), torch.randint(V, (T,), generator=gen)


@pytest.mark.parametrize("name", ROUTERS.names())
def test_decision_contract(name):
    router = make(name)
    decision = router(*inputs())
    K = decision.expert_ids_TK.shape[1]
    assert decision.expert_ids_TK.shape == decision.weights_TK.shape == decision.active_TK.shape == (T, K)
    assert decision.probs_TE.shape == (T, E)
    assert decision.expert_ids_TK.dtype == torch.long
    assert ((decision.expert_ids_TK >= 0) & (decision.expert_ids_TK < E)).all()
    assert (decision.weights_TK >= 0).all()
    assert (decision.weights_TK[~decision.active_TK] == 0).all()
    torch.testing.assert_close(decision.probs_TE.sum(-1), torch.ones(T))
    per_token = decision.experts_per_token_T
    assert (per_token >= 1).all() and (per_token <= router.options.max_experts_per_token()).all()
    # No expert twice for one token: the mask counts each selected expert once.
    assert torch.equal(decision.expert_mask_TE().sum(-1), per_token.float())


@pytest.mark.parametrize("k", [1, 2, 4])
def test_topk_selects_the_k_most_probable_experts(k):
    decision = make("topk", k=k)(*inputs())
    top = decision.probs_TE.topk(k, dim=-1)
    assert torch.equal(decision.expert_ids_TK.sort(-1).values, top.indices.sort(-1).values)
    torch.testing.assert_close(decision.weights_TK, top.values)  # raw probabilities: not renormalized by default
    assert decision.experts_per_token_T.eq(k).all()


def test_topk_renormalize_and_sigmoid():
    decision = make("topk", k=3, renormalize=True)(*inputs())
    torch.testing.assert_close(decision.weights_TK.sum(-1), torch.ones(T))
    sig = make("topk", k=2, score="sigmoid")(*inputs())
    assert (sig.weights_TK < 1).all() and (sig.weights_TK > 0).all()


def test_topk_router_receives_gradient_through_weights():
    router = make("topk", k=1)
    x, ids = inputs()
    router(x, ids).weights_TK.sum().backward()
    assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0


def test_hash_is_a_fixed_function_of_token_id():
    router = make("hash")
    x1, ids = inputs(0)
    x2, _ = inputs(1)
    a, b = router(x1, ids), router(x2, ids)  # different hidden states, same token ids
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.expert_ids_TK[:, 0], router.table_V[ids])
    again = make("hash")  # same seed and layer -> same table, on any rank and in any run
    assert torch.equal(again.table_V, router.table_V)
    other_layer = ROUTERS.get("hash")(RouterContext(D, E, V, layer_index=2, seed=3), ROUTERS.get("hash").Options())
    assert not torch.equal(other_layer.table_V, router.table_V)
    assert sum(p.numel() for p in router.parameters()) == 0  # parameter-free


def test_hash_table_is_saved_in_state_dict():
    assert "table_V" in make("hash").state_dict()
