"""Capacity and drop policies: which routes survive, in which buffer position."""
import torch

from moe_models.dispatch.capacity import assign_slots
from moe_models.routing import RoutingDecision


def decision(ids, weights):
    ids, weights = torch.tensor(ids), torch.tensor(weights, dtype=torch.float32)
    probs = torch.full((ids.shape[0], 3), 1 / 3)
    return RoutingDecision(ids, weights, torch.ones_like(ids, dtype=torch.bool), probs)


def test_dropless_keeps_every_route_with_unique_locations():
    d = decision([[0, 1], [0, 2], [0, 1], [2, 0]], [[0.5, 0.5]] * 4)
    slots = assign_slots(d, None, "position")
    assert slots.kept_TK.all()
    assert slots.capacity == 4  # expert 0 receives four routes
    pairs = {(e, l) for e, l in zip(d.expert_ids_TK.flatten().tolist(), slots.location_TK.flatten().tolist())}
    assert len(pairs) == 8  # no two routes share an expert buffer slot


def test_position_policy_keeps_earliest_tokens_and_first_choices_first():
    # capacity = ceil(1.0 * 8 routes / 3 experts) = 3
    d = decision([[0, 1], [0, 2], [0, 1], [1, 0]], [[0.5, 0.5]] * 4)
    slots = assign_slots(d, 1.0, "position")
    assert slots.capacity == 3
    # Expert 0: first choices of tokens 0,1,2 fill it; token 3's second choice (expert 0) is dropped.
    assert slots.kept_TK.tolist() == [[True, True], [True, True], [True, True], [True, False]]


def test_probs_policy_keeps_highest_weight_routes():
    d = decision([[0], [0], [0], [1]], [[0.1], [0.9], [0.5], [0.8]])
    slots = assign_slots(d, 0.5, "probs")  # capacity = ceil(0.5 * 4 / 3) = 1
    assert slots.capacity == 1
    assert slots.kept_TK[:, 0].tolist() == [False, True, False, True]


def test_inactive_routes_are_never_kept():
    d = decision([[0, 1], [1, 2]], [[1.0, 0.0], [1.0, 0.0]])
    d.active_TK[:, 1] = False
    slots = assign_slots(d, None, "position")
    assert slots.kept_TK.tolist() == [[True, False], [True, False]]
