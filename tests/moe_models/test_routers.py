"""Property tests over every registered router: the contract every dispatch backend relies on."""
import math

import pytest
import torch

from moe_models.routers import ROUTERS, RouterContext

E, D, V, T, DOMAINS = 6, 16, 50, 64, 3


COUNTS_V = torch.arange(V, 0, -1).float()  # a frequency table for routers built from data (balanced hash)


def make(name: str, **options):
    cls = ROUTERS.get(name)
    ctx = RouterContext(d_model=D, num_experts=E, vocab_size=V, layer_index=1, seed=3, num_domains=DOMAINS,
                        token_counts_V=COUNTS_V)
    return cls(ctx, cls.Options(**options))


def inputs(seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, D, generator=gen), torch.randint(V, (T,), generator=gen)


def domains(seed: int = 0):
    return torch.randint(DOMAINS, (T,), generator=torch.Generator().manual_seed(seed + 7))


def route(router, seed: int = 0):
    return router(*inputs(seed), domains(seed)) if router.needs_domains else router(*inputs(seed))


@pytest.mark.parametrize("name", ROUTERS.names())
def test_decision_contract(name):
    router = make(name)
    decision = route(router)
    K = decision.expert_ids_TK.shape[1]
    assert decision.expert_ids_TK.shape == decision.weights_TK.shape == decision.active_TK.shape == (T, K)
    assert decision.probs_TE.shape == (T, E)
    assert decision.expert_ids_TK.dtype == torch.long
    assert ((decision.expert_ids_TK >= 0) & (decision.expert_ids_TK < E)).all()
    assert (decision.weights_TK >= 0).all()
    assert (decision.weights_TK[~decision.active_TK] == 0).all()
    torch.testing.assert_close(decision.probs_TE.sum(-1), torch.ones(T))
    per_token = decision.experts_per_token_T
    bound = E // DOMAINS if router.needs_domains else router.options.max_experts_per_token(E)
    assert (per_token >= type(router).min_experts_per_token).all() and (per_token <= bound).all()
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
    assert torch.equal(a.expert_ids_TK[:, 0], router.table_VK[ids, 0])
    again = make("hash")  # same seed and layer -> same table, on any rank and in any run
    assert torch.equal(again.table_VK, router.table_VK)
    other_layer = ROUTERS.get("hash")(RouterContext(D, E, V, layer_index=2, seed=3), ROUTERS.get("hash").Options())
    assert not torch.equal(other_layer.table_VK, router.table_VK)
    assert sum(p.numel() for p in router.parameters()) == 0  # parameter-free


def test_hash_table_is_saved_in_state_dict():
    assert "table_VK" in make("hash").state_dict()


@pytest.mark.parametrize("table", ["random", "balanced"])
def test_hash_top_k_gives_k_distinct_experts_of_weight_one_over_k(table):
    decision = make("hash", k=3, table=table)(*inputs())
    assert torch.equal(decision.expert_mask_TE().sum(-1), torch.full((T,), 3.0))
    torch.testing.assert_close(decision.weights_TK, torch.full((T, 3), 1 / 3))


def zipf_stream(vocab: int, tokens: int, seed: int) -> torch.Tensor:
    weights = 1.0 / torch.arange(1, vocab + 1).float()  # Zipf, s = 1
    perm = torch.randperm(vocab, generator=torch.Generator().manual_seed(0))  # frequent ids anywhere in V
    return perm[torch.multinomial(weights, tokens, replacement=True, generator=torch.Generator().manual_seed(seed))]


@pytest.mark.parametrize("k", [1, 2])
def test_balanced_hash_keeps_the_largest_load_within_ten_percent_of_the_mean_on_zipf(k):
    vocab, experts = 4000, 8
    train, held_out = zipf_stream(vocab, 200_000, seed=0), zipf_stream(vocab, 50_000, seed=1)  # fresh sample
    counts = torch.bincount(train, minlength=vocab)
    loads = {}
    for table in ("random", "balanced"):
        cls = ROUTERS.get("hash")
        router = cls(RouterContext(D, experts, vocab, 0, 0, token_counts_V=counts), cls.Options(table=table, k=k))
        decision = router(torch.zeros(len(held_out), D), held_out)
        loads[table] = decision.routes_per_expert_E()
    balanced = loads["balanced"]
    assert balanced.max() <= 1.10 * balanced.mean()
    # The random table is what balancing buys us against: Zipf's head token alone is ~11% of the stream.
    assert loads["random"].max() / loads["random"].mean() > balanced.max() / balanced.mean()


def test_balanced_hash_needs_token_counts():
    cls = ROUTERS.get("hash")
    with pytest.raises(ValueError, match="token counts"):
        cls(RouterContext(D, E, V, 0, 0), cls.Options(table="balanced"))


@pytest.mark.parametrize("p", [0.1, 0.4, 0.75, 1.0])
def test_top_p_selects_the_minimal_prefix_reaching_p(p):
    decision = make("top_p", p=p)(*inputs())
    probs = decision.probs_TE
    for t in range(T):
        chosen = decision.expert_ids_TK[t][decision.active_TK[t]]
        mass = probs[t, chosen].sum()
        assert mass >= p - 1e-6  # reaches p ...
        assert mass - probs[t, chosen].min() < p  # ... and dropping its least probable expert would not
        others = torch.ones(E, dtype=torch.bool)
        others[chosen] = False
        if others.any():  # the chosen experts are the most probable ones
            assert probs[t, chosen].min() >= probs[t, others].max()
    torch.testing.assert_close(decision.weights_TK, probs.gather(1, decision.expert_ids_TK) * decision.active_TK)


def test_top_p_cap_and_entropy_loss():
    decision = make("top_p", p=1.0, max_k=2, entropy_loss=0.5)(*inputs())
    assert decision.experts_per_token_T.eq(2).all()
    entropy = -(decision.probs_TE * decision.probs_TE.log()).sum(-1).mean()
    assert decision.router_losses["top_p_entropy"].item() == pytest.approx(0.5 * entropy.item(), rel=1e-5)


def test_entropy_adaptive_k_maps_the_normalized_entropy_onto_its_range():
    """Report 003: H / log E, mapped linearly onto [min_k, max_k] (its setting: min_k 1, max_k 9)."""
    from moe_models.routers.entropy_adaptive import adaptive_k

    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4, [0.6, 0.3, 0.1, 0.0]])
    entropy = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(4)  # 0, 0.5, 1, 0.648
    assert adaptive_k(probs, 1, 9).tolist() == [1, 5, 9, 6] == (1 + 8 * entropy).round().long().tolist()
    assert adaptive_k(probs, 1, 4, "perplexity").tolist() == [1, 2, 4, 3]  # exp(H): 1, 2, 4, 2.45 -> ceil
    assert adaptive_k(probs, 2, 3, "perplexity").tolist() == [2, 2, 3, 3]
    decision = make("entropy_adaptive", min_k=1, max_k=3)(*inputs())
    assert torch.equal(decision.experts_per_token_T, adaptive_k(decision.probs_TE, 1, 3))
    torch.testing.assert_close(decision.weights_TK.sum(-1), torch.ones(T))


def test_entropy_adaptive_k_varies_across_tokens_once_the_router_has_trained():
    """A near-uniform router gives every token about the same k; training it (here: to send each of four token
    clusters to its own expert, through the layer's output) makes confident tokens take fewer experts."""
    from moe_models.moe_ffn import moe_forward
    from tests.tiny_layers import tiny_moe

    layer = tiny_moe("entropy_adaptive", {"min_k": 1, "max_k": 4}, d_model=8, num_experts=4)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 8, generator=gen) * 3
    cluster = torch.randint(0, 4, (256,), generator=gen)
    x = (centers[cluster] + 0.3 * torch.randn(256, 8, generator=gen)).unsqueeze(0)
    target = torch.randn(4, 8, generator=gen)[cluster].unsqueeze(0)
    before = layer.router(x.reshape(-1, 8), torch.zeros(256, dtype=torch.long)).experts_per_token_T.float()
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(150):
        optimizer.zero_grad()
        y, _ = moe_forward(layer, x, torch.zeros(1, 256, dtype=torch.long))
        ((y - target) ** 2).mean().backward()
        optimizer.step()
    after = layer.router(x.reshape(-1, 8), torch.zeros(256, dtype=torch.long)).experts_per_token_T.float()
    assert after.std() > 0.3 and after.std() > before.std()  # k differs across tokens
    assert after.mean() < before.mean()  # and confident tokens take fewer experts


def test_top_any_never_leaves_a_token_without_an_expert_and_trains_thresholds():
    router = make("top_any", init_threshold=5.0)  # threshold sigmoid(50) ~ 1: no expert passes
    router.eval()
    decision = router(*inputs())
    assert decision.experts_per_token_T.eq(1).all()  # argmax fallback
    assert torch.equal(decision.expert_ids_TK[decision.active_TK], decision.probs_TE.argmax(-1))
    router.train()
    open_router = make("top_any", init_threshold=-5.0)  # every expert passes
    d = open_router(*inputs())
    assert d.experts_per_token_T.eq(E).all()
    torch.testing.assert_close(d.weights_TK.sum(-1), torch.ones(T))
    d.weights_TK.pow(2).sum().backward()  # straight-through: gradients reach embeddings and thresholds
    assert open_router.threshold_E.grad.abs().sum() > 0 and open_router.expert_emb_ED.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["mlp", "attention", "hybrid", "mlp_hadamard"])
def test_architecture_routers_are_trainable_top_k(name):
    router = make(name, k=2)
    x, ids = inputs()
    decision = router(x, ids)
    assert decision.experts_per_token_T.eq(2).all()
    decision.weights_TK.sum().backward()
    assert all(p.grad is not None for p in router.parameters() if p.requires_grad)


def test_reference_router_sends_each_domain_to_its_own_expert_block():
    from moe_models.analytics import routing_sums, specialization

    router = make("reference")
    x, ids = inputs()
    dom = domains()
    decision = router(x, ids, dom)
    block = E // DOMAINS
    assert torch.equal(decision.expert_ids_TK // block, dom.unsqueeze(-1).expand(-1, block))
    sums = routing_sums(decision, decision.active_TK, dom, DOMAINS)
    assert specialization(sums["domain_expert_DE"])["purity"] == pytest.approx(1.0)
    assert specialization(sums["domain_expert_DE"])["domain_expert_nmi"] > 0.9


def test_reference_router_refuses_unlabelled_data():
    cls = ROUTERS.get("reference")
    with pytest.raises(ValueError, match="routes by domain label"):
        cls(RouterContext(D, E, V, 0, 0, num_domains=0), cls.Options())


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_state_has_no_scalar_tensors(name):
    """DeepSpeed's engine broadcasts every parameter at init by viewing it as bytes, which fails on 0-dim tensors."""
    router = make(name)
    assert all(t.dim() > 0 for t in [*router.parameters(), *router.buffers()])


@pytest.mark.parametrize("capacity", [0.5, 1.0, 2.0])
def test_expert_choice_gives_every_expert_the_same_number_of_tokens(capacity):
    decision = make("expert_choice", capacity=capacity)(*inputs())
    per_expert = decision.routes_per_expert_E()
    assert per_expert.eq(math.ceil(capacity * T / E)).all()  # balanced by construction
    # Each expert took its most probable tokens: any token it skipped scores no higher than the ones it took.
    taken = decision.expert_mask_TE().bool()
    for e in range(E):
        assert decision.probs_TE[~taken[:, e], e].max() <= decision.probs_TE[taken[:, e], e].min()
    torch.testing.assert_close(decision.weights_TK, decision.probs_TE * taken)


def test_expert_choice_is_not_causal_a_later_token_changes_an_earlier_tokens_experts():
    router = make("expert_choice")
    x, ids = inputs()
    w = router.proj.weight.detach()
    x[0] = w[0] / w[0].square().sum()  # token 0: logit 1 for expert 0, so expert 0 picks it among noise tokens
    assert router(x, ids).active_TK[0, 0]
    expert = 0
    x2 = x.clone()
    x2[1:] = 100 * w[0] / w[0].square().sum()  # only later tokens change: logit 100 for expert 0
    second = router(x2, ids)
    assert expert not in second.expert_ids_TK[0][second.active_TK[0]].tolist()  # ... and crowd token 0 out
    assert not type(router).causal and all(ROUTERS.get(n).causal for n in ROUTERS.names() if n != "expert_choice")


def test_info_nce_is_log_n_for_uninformative_views_and_near_zero_for_matching_ones():
    from moe_models.routers.self_supervised import info_nce

    n = 32
    same = torch.zeros(n, 8)
    same[:, 0] = 1.0  # every row identical: the positive is no more similar than any negative
    assert info_nce(same, same, temperature=0.1).item() == pytest.approx(math.log(n), rel=1e-5)
    distinct = torch.eye(n)  # orthogonal rows: the positive stands out by 1/temperature
    assert info_nce(distinct, distinct, temperature=0.01).item() < 1e-6


def test_self_supervised_router_adds_its_contrastive_loss_only_in_training_and_trains_its_features():
    router = make("self_supervised", k=2, contrastive_weight=0.5)
    x, ids = inputs()
    decision = router.train()(x, ids)
    loss = decision.router_losses["contrastive"]
    assert 0 < loss.item() < 0.5 * math.log(T) * 1.5
    loss.backward()
    assert router.features[0].weight.grad.abs().sum() > 0 and router.head.weight.grad is None  # pretext: phi only
    assert "contrastive" not in router.eval()(x, ids).router_losses


@pytest.mark.parametrize("name", ROUTERS.names())
def test_router_math_is_fp32_in_a_bf16_model_and_leaves_its_parameters_alone(name):
    """Routers compute in fp32 (bf16 logits flip choices between ranks), on casts: a router that converted its own
    modules (`module.float()`) would swap out the tensors DeepSpeed's optimizers hold, mid-forward."""
    router = make(name).train().bfloat16()
    before = {n: (p.dtype, p.data_ptr()) for n, p in router.named_parameters()}
    x, ids = inputs()
    x = x.bfloat16()
    decision = router(x, ids, domains()) if router.needs_domains else router(x, ids)
    assert decision.probs_TE.dtype == decision.weights_TK.dtype == torch.float32
    loss = decision.weights_TK.square().sum() + sum(decision.router_losses.values(), torch.zeros(()))
    if loss.requires_grad:
        loss.backward()
    assert {n: (p.dtype, p.data_ptr()) for n, p in router.named_parameters()} == before
    assert all(p.grad is None or p.grad.dtype == torch.bfloat16 for p in router.parameters())
