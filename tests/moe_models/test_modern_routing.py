"""The routing of today's open MoE models as options of the top-k router, each against its reference: transformers'
DeepSeek-V3, DeepSeek-V4 and GPT-OSS routers (same weights, same selection, same gate weights), Megatron-Core's
Quantile Balancing rule (transcribed below), and Megatron's forced uniform routing."""
import pytest
import torch
from transformers import DeepseekV3Config, DeepseekV4Config, GptOssConfig
from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
from transformers.models.deepseek_v4.modeling_deepseek_v4 import DeepseekV4TopKRouter
from transformers.models.gpt_oss.modeling_gpt_oss import GptOssTopKRouter

from moe_models.routers import ROUTERS, RouterContext
from moe_models.routers.options import TopKOptions
from moe_models.routers.topk import quantile_bias

D, E, T = 16, 8, 64
# Each method in a layer of 4 experts, as the layer, placement and characterization tests run it.
MODERN = {"deepseek_v3": {"k": 2, "score": "sigmoid", "n_group": 2, "topk_group": 1, "routed_scaling_factor": 2.5,
                          "renormalize": True, "expert_bias_rate": 0.01},
          "gpt_oss": {"k": 2, "router_bias": True, "renormalize": True},
          "quantile": {"k": 2, "score": "sqrt_softplus", "quantile_balancing": True, "quantile_ema": 0.5},
          "uniform": {"k": 2, "force_uniform": True},
          "null": {"k": 2, "null_experts": 2, "renormalize": True},
          "densemixer": {"k": 2, "dense_gradient": True}}


def ours(**options) -> torch.nn.Module:
    router = ROUTERS.get("topk")(RouterContext(D, E, 100, 0, 0), TopKOptions(**options))
    return router.eval()


def by_expert(ids_TK: torch.Tensor, weights_TK: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each token's (experts, weights) in expert order: the references return them unsorted."""
    order = ids_TK.argsort(dim=-1)
    return ids_TK.gather(1, order), weights_TK.gather(1, order)


def assert_same_routing(decision, ref_ids, ref_weights):
    ids, weights = by_expert(decision.expert_ids_TK, decision.weights_TK)
    ref_ids, ref_weights = by_expert(ref_ids, ref_weights)
    assert torch.equal(ids, ref_ids)
    torch.testing.assert_close(weights, ref_weights.float(), rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("renormalize", [True, False])
def test_group_limited_topk_with_routed_scaling_is_deepseek_v3s_router(renormalize):
    config = DeepseekV3Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=2, n_group=4, topk_group=2,
                              routed_scaling_factor=2.5, norm_topk_prob=renormalize)
    reference = DeepseekV3TopkRouter(config)
    torch.manual_seed(0)
    torch.nn.init.normal_(reference.weight, std=0.5)
    reference.e_score_correction_bias.normal_(std=0.3)  # its aux-loss-free bias: selection only
    router = ours(k=2, score="sigmoid", n_group=4, topk_group=2, routed_scaling_factor=2.5, renormalize=renormalize,
                  expert_bias_rate=1e-3)
    router.proj.weight.data.copy_(reference.weight)
    router.expert_bias_E.copy_(reference.e_score_correction_bias)
    x_TD = torch.randn(T, D)
    _, ref_weights, ref_ids = reference(x_TD)
    decision = router(x_TD, torch.zeros(T, dtype=torch.long))
    assert_same_routing(decision, ref_ids, ref_weights)
    # The limit binds: without it, some token would pick an expert outside its two groups.
    free = ours(k=2, score="sigmoid", routed_scaling_factor=2.5, renormalize=renormalize, expert_bias_rate=1e-3)
    free.load_state_dict(router.state_dict())
    assert not torch.equal(free(x_TD, torch.zeros(T, dtype=torch.long)).expert_ids_TK.sort().values,
                           decision.expert_ids_TK.sort().values)


def test_each_token_keeps_its_experts_within_topk_group_groups():
    router = ours(k=3, score="sigmoid", n_group=4, topk_group=2)
    torch.nn.init.normal_(router.proj.weight, std=1.0)
    ids_TK = router(torch.randn(256, D), torch.zeros(256, dtype=torch.long)).expert_ids_TK
    groups_per_token = torch.tensor([len(set((row // (E // 4)).tolist())) for row in ids_TK])
    assert groups_per_token.max() <= 2 and (groups_per_token == 2).any()


def test_sqrt_softplus_scores_are_deepseek_v4s_router():
    config = DeepseekV4Config(hidden_size=D, n_routed_experts=E, num_experts_per_tok=2, routed_scaling_factor=1.5,
                              scoring_func="sqrtsoftplus")
    reference = DeepseekV4TopKRouter(config)
    torch.manual_seed(1)
    torch.nn.init.normal_(reference.weight, std=0.5)
    reference.e_score_correction_bias.normal_(std=0.1)
    router = ours(k=2, score="sqrt_softplus", renormalize=True, routed_scaling_factor=1.5, expert_bias_rate=1e-3)
    router.proj.weight.data.copy_(reference.weight)
    router.expert_bias_E.copy_(reference.e_score_correction_bias)
    x_TD = torch.randn(T, D)
    _, ref_weights, ref_ids = reference(x_TD)
    assert_same_routing(router(x_TD, torch.zeros(T, dtype=torch.long)), ref_ids, ref_weights)


def test_a_learned_logit_bias_with_renormalized_softmax_is_gpt_osss_router():
    """GPT-OSS takes a softmax over the top-k logits; that is the softmax over all experts renormalized over the
    top k (the normalizer cancels)."""
    reference = GptOssTopKRouter(GptOssConfig(hidden_size=D, num_local_experts=E, num_experts_per_tok=2))
    torch.manual_seed(2)
    torch.nn.init.normal_(reference.weight, std=0.5)
    torch.nn.init.normal_(reference.bias, std=0.5)
    router = ours(k=2, router_bias=True, renormalize=True)
    router.proj.weight.data.copy_(reference.weight)
    router.logit_bias_E.data.copy_(reference.bias)
    x_TD = torch.randn(T, D)
    _, ref_weights, ref_ids = reference(x_TD)
    assert_same_routing(router(x_TD, torch.zeros(T, dtype=torch.long)), ref_ids, ref_weights)
    # The bias is a parameter the loss trains, not a selection-only buffer.
    router.train()(x_TD, torch.zeros(T, dtype=torch.long)).weights_TK.sum().backward()
    assert router.logit_bias_E.grad is not None and router.logit_bias_E.grad.abs().sum() > 0


def megatron_qb_dual_update(scores, k, beta):
    """Megatron-Core's qb_dual_update (megatron/core/transformer/moe/moe_utils.py), its essential lines verbatim:
    selection by scores - beta, and the beta that gives each expert num_tokens * k / num_experts tokens."""
    num_tokens, num_experts = scores.shape
    topk_result = (scores - beta).topk(k + 1, dim=1)
    indices = topk_result.indices[:, :-1]
    col_target = num_tokens * k // num_experts
    alpha = topk_result.values[:, -1:]
    beta_local = (scores - alpha).topk(col_target + 1, dim=0).values[-1].contiguous()
    return indices, beta_local


def test_quantile_balancing_solves_megatrons_bias_on_a_hand_computed_case():
    # Every token prefers expert 0. Each token's cutoff alpha is its expert-1 score; expert 0's margins are
    # 0.8, 0.6, 0.4, 0.2, and it should take T*k/E = 2 tokens: beta_0 = the 3rd margin, 0.4. Expert 1's margins are
    # all 0: beta_1 = 0. Megatron's beta is subtracted; ours is added.
    scores = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.7, 0.3], [0.6, 0.4]])
    _, beta = megatron_qb_dual_update(scores, 1, torch.zeros(2))
    torch.testing.assert_close(beta, torch.tensor([0.4, 0.0]))
    torch.testing.assert_close(quantile_bias(scores, torch.zeros(2), 1), -beta)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_quantile_balancing_is_megatrons_rule_and_balances_the_batch_it_was_solved_on(k):
    torch.manual_seed(k)
    scores = (torch.randn(T, E) + torch.linspace(0, 2, E)).sigmoid()  # skewed towards the last experts
    beta = torch.randn(E) * 0.05
    indices, ref = megatron_qb_dual_update(scores, k, beta)
    torch.testing.assert_close(quantile_bias(scores, -beta, k), -ref)
    torch.testing.assert_close((scores - beta).topk(k, dim=1).indices, indices)
    counts = torch.bincount((scores + quantile_bias(scores, -beta, k)).topk(k, dim=1).indices.flatten(), minlength=E)
    before = torch.bincount(indices.flatten(), minlength=E)
    assert counts.float().std() < before.float().std()


def test_the_router_accumulates_quantile_solutions_and_sets_the_centred_mean_after_the_optimizer_step():
    router = ours(k=2, score="sigmoid", quantile_balancing=True, quantile_ema=0.5).train()
    torch.nn.init.normal_(router.proj.weight, std=1.0)
    router.expert_bias_E.fill_(0.2)
    batches = [torch.randn(T, D) for _ in range(3)]
    solved = []
    for x_TD in batches:  # the bias holds during the step: every micro-batch sees the same one
        scores = router.proj(x_TD).sigmoid().detach()
        solved.append(quantile_bias(scores, router.expert_bias_E, 2))
        router(x_TD, torch.zeros(T, dtype=torch.long))
    router.after_optimizer_step()
    expected = 0.5 * torch.full((E,), 0.2) + 0.5 * torch.stack(solved).mean(0)
    torch.testing.assert_close(router.expert_bias_E, expected - expected.mean())
    assert router.quantile_count.item() == 0  # the window closed


def test_quantile_balancing_evens_out_a_skewed_router_over_steps():
    torch.manual_seed(3)
    x_TD = torch.randn(4 * T, D) + 0.5  # a shared direction the router can favour some experts along

    def load_cv(router):
        ids = router.eval()(x_TD, torch.zeros(4 * T, dtype=torch.long)).expert_ids_TK
        counts = torch.bincount(ids.flatten(), minlength=E).float()
        return (counts.std() / counts.mean()).item()

    plain = ours(k=2, score="sigmoid")
    with torch.no_grad():
        plain.proj.weight.normal_(std=0.3).add_(torch.linspace(-0.3, 0.3, E)[:, None])
    balanced = ours(k=2, score="sigmoid", quantile_balancing=True)
    balanced.load_state_dict(plain.state_dict())
    for _ in range(5):
        balanced.train()(x_TD, torch.zeros(4 * T, dtype=torch.long))
        balanced.after_optimizer_step()
    assert load_cv(plain) > 1.0 and load_cv(balanced) < 0.2 * load_cv(plain)


def test_forced_uniform_routing_ignores_the_router_and_passes_its_gradient_straight_through():
    router = ours(k=1, force_uniform=True).train()
    with torch.no_grad():
        router.proj.weight.zero_()
        router.proj.weight[0] += 10.0  # a router that would send every token to expert 0
    x_TD = torch.ones(4096, D)
    decision = router(x_TD, torch.zeros(4096, dtype=torch.long))
    counts = torch.bincount(decision.expert_ids_TK.flatten(), minlength=E).float()
    assert counts.min() > 0.8 * 4096 / E  # uniform, whatever the weights say
    assert abs(decision.logits_TE.mean().item()) < 0.05 and abs(decision.logits_TE.std().item() - 1) < 0.05
    decision.logits_TE.sum().backward()
    torch.testing.assert_close(router.proj.weight.grad, x_TD.sum(0).expand(E, D))  # d(sum logits)/dW, unchanged


def test_null_experts_leave_a_token_fewer_real_routes_with_the_gate_weights_it_chose():
    router = ours(k=2, null_experts=4, renormalize=True)
    torch.nn.init.normal_(router.proj.weight, std=1.0)
    torch.nn.init.normal_(router.null_proj.weight, std=1.0)
    x_TD = torch.randn(512, D)
    decision = router(x_TD, torch.zeros(512, dtype=torch.long))
    # The same selection and weights over all E + N choices, computed by hand:
    logits = torch.cat([x_TD @ router.proj.weight.T, x_TD @ router.null_proj.weight.T], dim=-1)
    top = logits.softmax(-1).topk(2, dim=-1)
    weights = top.values / top.values.sum(-1, keepdim=True)
    real = top.indices < E
    assert torch.equal(decision.active_TK, real)
    torch.testing.assert_close(decision.weights_TK, weights * real)
    assert torch.equal(decision.expert_ids_TK[real], top.indices[real])
    assert (decision.expert_ids_TK[~real] == 0).all()  # an inactive slot, as top-p leaves them
    per_token = decision.experts_per_token_T
    assert set(per_token.unique().tolist()) == {0, 1, 2}  # adaptive: some tokens skip the experts entirely
    assert decision.probs_TE.shape == (512, E) and torch.allclose(decision.probs_TE.sum(-1), torch.ones(512))
    assert decision.routes_per_expert_E().sum() == per_token.sum()  # null routes are nobody's load
    assert not TopKOptions(k=2, null_experts=4).fixed_k and TopKOptions(k=2).fixed_k


@pytest.mark.parametrize("backend", ["grouped", "deepspeed"])
def test_densemixer_keeps_the_sparse_forward_and_gives_the_router_the_dense_mixtures_gradient(backend):
    from moe_models.moe_ffn import moe_forward
    from tests.tiny_layers import tiny_moe

    torch.manual_seed(4)
    sparse = tiny_moe("topk", {"k": 2}, d_model=D, expert_hidden=16, num_experts=4, vocab_size=50, backend=backend)
    dense = tiny_moe("topk", {"k": 2, "dense_gradient": True}, d_model=D, expert_hidden=16, num_experts=4,
                     vocab_size=50, backend=backend)
    dense.load_state_dict(sparse.state_dict())
    x, ids = torch.randn(2, 12, D), torch.randint(50, (2, 12))
    g = torch.randn(2, 12, D)
    y_sparse, _ = moe_forward(sparse.train(), x, ids)
    y_dense, _ = moe_forward(dense.train(), x, ids)
    torch.testing.assert_close(y_dense, y_sparse)  # the forward is the sparse one
    (y_sparse * g).sum().backward()
    (y_dense * g).sum().backward()
    # Experts learn from the sparse routes as before.
    expert_grads = {n: p.grad for n, p in sparse.named_parameters() if "router" not in n and p.grad is not None}
    for name, p in dense.named_parameters():
        if name in expert_grads:
            torch.testing.assert_close(p.grad, expert_grads[name], rtol=1e-5, atol=1e-6)
    # The router's gradient is the dense mixture's: d/dW of sum_t g_t . sum_e p_te E_e(x_t), outputs held constant.
    x_TD = x.reshape(-1, D)
    with torch.no_grad():
        outputs = torch.stack([expert_output(dense, e, x_TD) for e in range(4)])  # (E, T, D)
    proj = dense.router.proj.weight.detach().clone().requires_grad_(True)
    probs = (x_TD @ proj.T).softmax(-1)
    (torch.einsum("te,etd->td", probs, outputs) * g.reshape(-1, D)).sum().backward()
    torch.testing.assert_close(dense.router.proj.weight.grad, proj.grad, rtol=1e-4, atol=1e-6)
    assert not torch.allclose(sparse.router.proj.weight.grad, proj.grad)  # and it is not the sparse one


def expert_output(layer, e, x_TD):
    """Expert e's output for every token, through the layer's dispatch with weight 1."""
    from moe_models.routing import RoutingDecision

    T = x_TD.shape[0]
    ones = torch.ones(T, 1)
    return layer.dispatch(x_TD, RoutingDecision(torch.full((T, 1), e), ones, ones.bool(), torch.full((T, 4), 0.25),
                                                all_active=True)).y_TD


def test_options_that_do_not_fit_the_layer_are_refused_naming_the_option():
    with pytest.raises(ValueError, match="n_group: 3 groups do not split 8 experts"):
        ours(k=2, n_group=3)
    with pytest.raises(ValueError, match="k: k=5 exceeds the 4 experts"):
        ours(k=5, n_group=4, topk_group=2)
    with pytest.raises(ValueError, match="quantile_balancing solves the selection bias"):
        TopKOptions(k=2, quantile_balancing=True, expert_bias_rate=0.01)
    with pytest.raises(ValueError, match="null_experts take part in plain greedy top-k only"):
        TopKOptions(k=2, null_experts=2, expert_bias_rate=0.01)
    with pytest.raises(ValueError, match="topk_group=3 must be <= n_group=2"):
        TopKOptions(k=2, n_group=2, topk_group=3)
