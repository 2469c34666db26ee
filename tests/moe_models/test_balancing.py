"""Balancing losses at points where their value is known."""
import math

import pytest
import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment

from moe_models.assignment import ASSIGNMENTS
from moe_models.assignment.balanced import balanced_assignment, expert_capacities
from moe_models.assignment.sinkhorn import sinkhorn_plan
from moe_models.balancing import BALANCING_LOSSES
from moe_models.balancing.base import BalanceScope
from moe_models.routing import RoutingDecision

lbl = BALANCING_LOSSES.get("switch_lbl")
z_loss = BALANCING_LOSSES.get("z_loss")


def decision_from(ids_TK, probs_TE, logits_TE=None):
    active = torch.ones_like(ids_TK, dtype=torch.bool)
    return RoutingDecision(ids_TK, probs_TE.gather(1, ids_TK), active, probs_TE, logits_TE)


@pytest.mark.parametrize("E,K", [(4, 1), (8, 2), (6, 3)])
def test_lbl_is_one_under_perfectly_balanced_routing(E, K):
    T = 12 * E
    ids = torch.stack([(torch.arange(T) + j) % E for j in range(K)], dim=1)  # every expert gets K*T/E routes
    probs = torch.full((T, E), 1.0 / E)
    assert lbl(decision_from(ids, probs)).item() == pytest.approx(1.0)


def test_lbl_is_E_when_routing_collapses_onto_one_expert():
    E, T = 5, 40
    probs = F.one_hot(torch.zeros(T, dtype=torch.long), E).float()
    assert lbl(decision_from(torch.zeros(T, 1, dtype=torch.long), probs)).item() == pytest.approx(E)


def test_lbl_matches_hand_computation():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.1, 0.6, 0.3], [0.5, 0.25, 0.25], [0.2, 0.2, 0.6]])
    ids = torch.tensor([[0], [1], [0], [2]])
    f = torch.tensor([2, 1, 1]) / 4
    P = probs.mean(0)
    assert lbl(decision_from(ids, probs)).item() == pytest.approx(3 * float((f * P).sum()))


def test_lbl_gradient_flows_through_probabilities_only():
    logits = torch.randn(16, 4, requires_grad=True)
    probs = logits.softmax(-1)
    ids = probs.topk(1).indices
    lbl(decision_from(ids, probs)).backward()
    assert logits.grad.abs().sum() > 0


def test_z_loss_matches_formula():
    logits = torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]])
    expected = ((math.log(math.exp(1) + math.exp(2) + math.exp(3))) ** 2 + math.log(3) ** 2) / 2
    decision = decision_from(torch.tensor([[2], [0]]), logits.softmax(-1), logits)
    assert z_loss(decision).item() == pytest.approx(expected, rel=1e-6)


def test_z_loss_is_zero_for_parameter_free_routers():
    decision = decision_from(torch.tensor([[0], [1]]), torch.eye(2))
    assert z_loss(decision).item() == 0.0


squared_usage = BALANCING_LOSSES.get("squared_usage")
sequence_lbl = BALANCING_LOSSES.get("sequence_lbl")


def test_squared_usage_is_one_plus_cv_squared():
    E = 4
    assert squared_usage(decision_from(torch.zeros(8, 1, dtype=torch.long), torch.full((8, E), 0.25))).item() == \
        pytest.approx(1.0)
    collapsed = F.one_hot(torch.zeros(8, dtype=torch.long), E).float()
    assert squared_usage(decision_from(torch.zeros(8, 1, dtype=torch.long), collapsed)).item() == pytest.approx(E)
    probs = torch.tensor([[0.7, 0.1, 0.1, 0.1], [0.1, 0.5, 0.2, 0.2]])
    P = probs.mean(0)
    cv2 = (P.std(unbiased=False) / P.mean()) ** 2
    assert squared_usage(decision_from(probs.topk(1).indices, probs)).item() == pytest.approx(1 + cv2.item(), rel=1e-6)


def test_sequence_lbl_sees_imbalance_inside_sequences_that_the_batch_hides():
    E, S = 2, 4
    ids = torch.tensor([0] * S + [1] * S).unsqueeze(-1)  # sequence A -> expert 0, sequence B -> expert 1
    probs = F.one_hot(ids[:, 0], E).float()
    d, sequences = decision_from(ids, probs), BalanceScope("sequence", sequence_length=S)
    assert lbl(d).item() == pytest.approx(1.0)  # balanced over the batch ...
    assert sequence_lbl(d, sequences).item() == pytest.approx(E)  # ... collapsed inside every sequence
    assert lbl(d, sequences).item() == pytest.approx(E)  # switch_lbl at sequence scope: the same per-sequence loss
    balanced_ids = torch.tensor([0, 1] * S).unsqueeze(-1)
    d2 = decision_from(balanced_ids, torch.full((2 * S, E), 0.5))
    assert sequence_lbl(d2, sequences).item() == pytest.approx(1.0)


def test_expert_bias_moves_load_toward_balance_once_per_optimizer_step():
    from moe_models.optimizer_hooks import after_optimizer_step
    from moe_models.routers import ROUTERS, RouterContext

    E, D = 4, 8
    cls = ROUTERS.get("topk")
    router = cls(RouterContext(D, E, 10, 0, 0), cls.Options(k=1, expert_bias_rate=0.002))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        router.proj.weight.copy_(torch.randn(E, D, generator=gen))
        router.proj.weight[0, 0] = 6.0  # feature 0 is constant: expert 0 wins for nearly every token
    x = torch.randn(256, D, generator=gen)
    x[:, 0] = 1.0
    ids = torch.zeros(256, dtype=torch.long)
    load_cvs = []
    for _ in range(400):
        for _micro in range(2):  # gradient accumulation: counts add up across micro-batches ...
            router(x, ids)
        counts = router.step_counts_E.clone()
        assert counts.sum().item() == 2 * 256
        load_cvs.append(float(counts.std(unbiased=False) / counts.mean()))
        after_optimizer_step(router)  # ... and the bias moves once per optimizer step
        assert router.step_counts_E.sum().item() == 0
    assert load_cvs[0] > 1.5  # collapsed onto expert 0 at the start
    assert sum(load_cvs[-50:]) / 50 < 0.3  # the sign updates keep it near balance (small oscillation)
    assert router.expert_bias_E[0] < 0 and router.expert_bias_E.sum().abs() < 1e-5  # re-centred
    assert "expert_bias_E" in router.state_dict() and "step_counts_E" not in router.state_dict()
    d = router(x, ids)  # the bias picks experts; the gate values stay the unbiased probabilities
    torch.testing.assert_close(d.weights_TK, d.probs_TE.gather(1, d.expert_ids_TK))


# --- balancing by assignment: Sinkhorn (S-BASE) and BASE -------------------------------------------------------------


def skewed_logits(T: int, E: int, seed: int = 0) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(T, E, generator=gen) + torch.linspace(0, 3, E)  # expert E-1 is everyone's favourite


def test_sinkhorn_plan_has_uniform_marginals():
    T, E = 96, 6
    plan = sinkhorn_plan(skewed_logits(T, E))
    torch.testing.assert_close(plan.sum(dim=1), torch.full((T,), 1 / T), rtol=1e-3, atol=0)
    torch.testing.assert_close(plan.sum(dim=0), torch.full((E,), 1 / E), rtol=1e-3, atol=0)


def test_sinkhorn_assignment_balances_load_that_greedy_concentrates():
    T, E = 600, 6
    logits = skewed_logits(T, E)
    greedy = torch.bincount(ASSIGNMENTS.get("greedy")(logits, 1, True)[:, 0], minlength=E)
    sinkhorn = torch.bincount(ASSIGNMENTS.get("sinkhorn")(logits, 1, True)[:, 0], minlength=E)
    assert greedy.max() > 2.5 * T / E
    assert sinkhorn.max() < 1.25 * T / E
    assert torch.equal(ASSIGNMENTS.get("sinkhorn")(logits, 1, False), logits.topk(1).indices)  # greedy at eval


@pytest.mark.parametrize("T,E", [(24, 4), (30, 4), (50, 7)])
def test_base_assignment_is_balanced_and_matches_the_optimal_linear_assignment(T, E):
    scores = skewed_logits(T, E, seed=T)
    owner = balanced_assignment(scores)
    assert torch.bincount(owner, minlength=E).tolist() == expert_capacities(T, E)
    # Reference: scipy's exact solver on the slot-expanded matrix (one column per expert slot).
    columns = torch.cat([torch.full((c,), e) for e, c in enumerate(expert_capacities(T, E))])
    rows, cols = linear_sum_assignment(scores[:, columns].numpy(), maximize=True)
    optimum = float(scores[:, columns].numpy()[rows, cols].sum())
    achieved = float(scores.gather(1, owner.unsqueeze(1)).sum())
    assert achieved == pytest.approx(optimum, abs=1e-2)


def test_base_is_greedy_top1_at_evaluation_and_rejects_k_above_1():
    logits = skewed_logits(40, 4)
    assert torch.equal(ASSIGNMENTS.get("base")(logits, 1, False), logits.argmax(-1, keepdim=True))
    with pytest.raises(ValueError, match="top-1"):
        ASSIGNMENTS.get("base")(logits, 2, True)


@pytest.mark.parametrize("k", [1, 2, 3])
def test_switch_lbl_equals_hf_load_balancing_loss_divided_by_k(k):
    """HF's Mixtral load_balancing_loss_func divides route counts by T (uniform routing scores k); we divide by K*T as
    Megatron does (uniform routing scores 1). On one layer's logits the two agree up to that factor k."""
    from transformers.models.mixtral.modeling_mixtral import load_balancing_loss_func

    E, T = 6, 200
    logits = skewed_logits(T, E, seed=k)
    probs = logits.softmax(-1)
    ids = probs.topk(k, dim=-1).indices
    decision = RoutingDecision(ids, probs.gather(1, ids), torch.ones_like(ids, dtype=torch.bool), probs, logits)
    ours = BALANCING_LOSSES.get("switch_lbl")(decision)
    hf = load_balancing_loss_func((logits,), num_experts=E, top_k=k)
    torch.testing.assert_close(ours * k, hf)


def test_routing_state_stays_fp32_in_a_bf16_model_so_the_expert_bias_moves_as_in_fp32():
    """module.bfloat16() casts every float buffer (fp32_state.py says who does that). The expert bias and the route
    counts are accumulators: in bf16, counts above 256 round, and a bias step of u rounds to bf16's
    spacing near |b| (it vanishes once |b| > 256*u). A bf16 model's router, fed bf16-representable inputs (its math is fp32), must count and move its
    bias exactly as the fp32 model's does."""
    from moe_models.moe_ffn import MoEFeedForward, moe_forward
    from moe_models.optimizer_hooks import after_optimizer_step
    from tests.tiny_layers import tiny_moe

    E, D, T = 4, 8, 1000

    def layer() -> MoEFeedForward:
        moe = tiny_moe("topk", {"k": 1, "expert_bias_rate": 0.004}, d_model=D, num_experts=E, vocab_size=10,
                       backend="grouped", balancing={"switch_lbl": 0.01}, scope="global_batch")
        with torch.no_grad():
            moe.router.proj.weight[0, 0] = 6.0  # expert 0 wins nearly every token: the bias must travel far
        return moe.train()

    fp32, bf16 = layer(), layer().bfloat16()
    assert bf16.router.proj.weight.dtype == torch.bfloat16  # the model is cast ...
    for model in (bf16, bf16.router):  # ... its routing state is not
        assert all(b.dtype == torch.float32 for n, b in model.named_buffers(recurse=False)), model
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(1)).bfloat16()
    x[..., 0] = 1.0
    ids = torch.zeros(1, T, dtype=torch.long)
    for _ in range(150):
        for model, inputs in ((fp32, x.float()), (bf16, x)):
            moe_forward(model, inputs, ids)
            moe_forward(model, inputs, ids)  # two micro-batches per optimizer step: 2000 routes
            assert model.router.step_counts_E.sum().item() == 2 * T
            torch.testing.assert_close(model.window_routes_E, model.router.step_counts_E)
            after_optimizer_step(model)
        torch.testing.assert_close(bf16.router.expert_bias_E, fp32.router.expert_bias_E, rtol=0, atol=0)
    assert bf16.router.expert_bias_E.abs().max() > 0.5  # where bf16's spacing is 2**-8 ~ u: a bf16 bias steps wrong
    # Device and dtype moves still reach the state; a meta copy keeps its fp32 shape.
    meta = bf16.to("meta")
    assert meta.router.expert_bias_E.is_meta and meta.router.expert_bias_E.dtype == torch.float32
