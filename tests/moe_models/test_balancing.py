"""Balancing losses at points where their value is known."""
import math

import pytest
import torch
import torch.nn.functional as F

from moe_models.balancing import BALANCING_LOSSES
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
