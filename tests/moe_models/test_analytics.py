"""Routing analytics on hand-built routing decisions with known answers."""
import math

import numpy as np
import pytest
import torch

from moe_models.analytics import (add_sums, difficulty_sums, pearson, routing_sums, saturation, specialization,
                                  summarize)
from moe_models.routing import RoutingDecision


def top1(expert_ids, E=4):
    ids = torch.tensor(expert_ids).unsqueeze(-1)
    probs = torch.nn.functional.one_hot(ids[:, 0], E).float()
    return RoutingDecision(ids, torch.ones(ids.shape), torch.ones_like(ids, dtype=torch.bool), probs)


def test_balanced_load():
    d = top1([0, 1, 2, 3] * 5)
    s = summarize(routing_sums(d, d.active_TK))
    assert s["load_cv"] == 0 and s["max_violation"] == 0 and s["utilization"] == pytest.approx(1.0)
    assert s["dead_experts"] == 0 and s["load_entropy_norm"] == pytest.approx(1.0)
    assert s["expert_fraction"] == [0.25] * 4 and s["experts_per_token"] == 1.0 and s["drop_fraction"] == 0


def test_collapsed_load():
    d = top1([2] * 8)
    s = summarize(routing_sums(d, d.active_TK))
    assert s["utilization"] == pytest.approx(0.25)  # 1/E when collapsed
    assert s["dead_experts"] == 3 and s["max_violation"] == pytest.approx(3.0)  # max/mean - 1 = 8/2 - 1
    assert s["load_cv"] == pytest.approx(math.sqrt(3))  # loads (0,0,8,0): std 3.46, mean 2


def test_partial_imbalance_and_drops():
    d = top1([0, 0, 0, 1, 1, 2])  # fractions 1/2, 1/3, 1/6, 0
    kept = torch.tensor([[True], [True], [False], [True], [True], [True]])
    s = summarize(routing_sums(d, kept))
    assert s["utilization"] == pytest.approx(0.25 + 0.25 + 1 / 6)
    assert s["max_violation"] == pytest.approx(3 / 1.5 - 1)
    assert s["drop_fraction"] == pytest.approx(1 / 6)


def test_purity_and_nmi():
    perfect = torch.tensor([[5.0, 0, 0], [0, 0, 7.0]])  # 2 domains -> distinct experts
    assert specialization(perfect) == {"purity": 1.0, "domain_expert_nmi": pytest.approx(1.0),
                                       "reference_agreement": 1.0}
    independent = torch.tensor([[2.0, 2.0], [2.0, 2.0]])  # expert tells nothing about domain
    result = specialization(independent)
    assert result["purity"] == pytest.approx(0.5) and result["domain_expert_nmi"] == pytest.approx(0.0, abs=1e-12)
    mixed = torch.tensor([[3.0, 1.0], [1.0, 3.0]])
    assert specialization(mixed)["purity"] == pytest.approx(0.75)
    # Permuted expert ids agree fully; one expert serving two domains can match only one of them.
    assert specialization(torch.tensor([[0.0, 0, 4], [3.0, 0, 0]]))["reference_agreement"] == 1.0
    assert specialization(torch.tensor([[4.0, 0], [4.0, 0]]))["reference_agreement"] == pytest.approx(0.5)


def test_domain_sums_accumulate_across_batches():
    a, b = top1([0, 1, 0]), top1([1, 1, 0])
    dom_a, dom_b = torch.tensor([0, 1, 0]), torch.tensor([1, 0, 0])
    total = add_sums(routing_sums(a, a.active_TK, dom_a, 2), routing_sums(b, b.active_TK, dom_b, 2))
    assert total["domain_expert_DE"].tolist() == [[3, 1, 0, 0], [0, 2, 0, 0]]
    assert summarize(total)["purity"] == pytest.approx(5 / 6)  # expert 1 mixes domains: 2 of its 3 tokens count
    assert summarize(total)["domain_expert_share"] == [[0.75, 0.25, 0, 0], [0, 1.0, 0, 0]]  # N_e(D) / N(D)


def two_slot(ids, active):
    """K=2 decisions from explicit expert ids and active masks, E=4, equal weights on active slots."""
    ids, active = torch.tensor(ids), torch.tensor(active)
    weights = active.float() * 0.5
    probs = torch.full((len(ids), 4), 0.25)
    return RoutingDecision(ids, weights, active, probs)


def test_coactivation_histogram_and_drop_accounting():
    d = two_slot([[0, 1], [0, 1], [0, 2], [3, 0]], [[True, True], [True, True], [True, True], [True, False]])
    kept = torch.tensor([[True, True], [True, False], [False, False], [True, False]])
    s = summarize(routing_sums(d, kept))
    c = torch.tensor(s["coactivation"])
    assert c[0].tolist() == pytest.approx([1.0, 2 / 3, 1 / 3, 0.0])  # 3 tokens at expert 0: 2 also at 1, 1 at 2
    assert c[1, 0] == 1.0 and c[3, 3] == 1.0 and c[3, 0] == 0.0
    assert s["experts_per_token_hist"] == pytest.approx([0, 0.25, 0.75, 0, 0])  # one token has 1 expert, three 2
    assert s["experts_per_token_std"] == pytest.approx(float(np.std([1, 2, 2, 2])))
    assert s["tokens_lost_a_route"] == pytest.approx(0.5)  # tokens 1 and 2
    assert s["tokens_lost_all_routes"] == pytest.approx(0.25)  # token 2
    assert s["gate_mass_dropped"] == pytest.approx(1.5 / 3.5)  # 3 dropped half-weight routes of 7


def test_difficulty_correlation_is_pearson_and_nan_for_constant_k():
    gen = torch.Generator().manual_seed(0)
    experts, loss = torch.randint(1, 4, (500,), generator=gen).float(), torch.randn(500, generator=gen)
    loss = loss + experts  # more experts where the loss is higher
    half = add_sums(difficulty_sums(experts[:250], loss[:250]), difficulty_sums(experts[250:], loss[250:]))
    assert pearson(half) == pytest.approx(float(torch.corrcoef(torch.stack([experts, loss]).double())[0, 1]), rel=1e-9)
    assert math.isnan(pearson(difficulty_sums(torch.full((10,), 2.0), torch.randn(10))))


def test_saturation_counts_shared_choices_against_the_final_router():
    final = torch.tensor([[1, 1, 0], [0, 1, 1], [1, 0, 0]], dtype=torch.bool)
    assert saturation(final, final) == 1.0
    earlier = torch.tensor([[1, 0, 1], [0, 1, 1], [0, 1, 0]], dtype=torch.bool)
    assert saturation(earlier, final) == pytest.approx((0.5 + 1.0 + 0.0) / 3)


def test_predictive_entropy_per_token_is_computed_only_when_evaluating():
    import numpy as np
    from scipy import stats

    from moe_models.models.common import next_token_output

    logits = torch.randn(2, 5, 11, generator=torch.Generator().manual_seed(0))
    targets = torch.randint(11, (2, 5))
    with torch.no_grad():
        out = next_token_output(logits, targets, {})
    probs = torch.softmax(logits, -1).numpy()
    assert np.allclose(out.token_entropy_BS.numpy(), stats.entropy(probs, axis=-1), atol=1e-5)
    assert next_token_output(logits.requires_grad_(), targets, {}).token_entropy_BS is None  # a training step


def test_a_decoders_sequence_loss_is_each_windows_mean_nll_and_only_when_evaluating():
    from moe_models.models.common import next_token_output

    logits = torch.randn(3, 4, 7, generator=torch.Generator().manual_seed(1))
    targets = torch.randint(7, (3, 4), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        out = next_token_output(logits, targets, {})
    per_window = [torch.nn.functional.cross_entropy(logits[b], targets[b]).item() for b in range(3)]
    torch.testing.assert_close(out.sequence_nll_B, torch.tensor(per_window))
    assert next_token_output(logits.requires_grad_(), targets, {}).sequence_nll_B is None  # a training step
