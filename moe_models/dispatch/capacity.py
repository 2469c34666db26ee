"""Expert capacity and token dropping, shared by every dispatch backend so that they drop the same routes.

Capacity C = ceil(capacity_factor * routes / E) (GShard; routes = K*T for fixed k). Routes are served slot-major
(every token's first choice before any second choice, as GShard/DeepSpeed do); within a slot, policy "position" keeps
the earliest tokens and "probs" the highest-weight routes (Megatron's drop policies). capacity_factor None = dropless.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moe_models.routing import RoutingDecision
from moe_models.spec import DropPolicy


@dataclass
class SlotAssignment:
    kept_TK: torch.Tensor  # bool: route is active and fits in its expert's buffer
    location_TK: torch.Tensor  # long: position of the route inside its expert's buffer (valid where kept)
    capacity: int  # buffer length per expert (C)


def assign_slots(decision: RoutingDecision, capacity_factor: float | None, drop_policy: DropPolicy) -> SlotAssignment:
    T, K = decision.expert_ids_TK.shape
    E = decision.num_experts
    ids_R = decision.expert_ids_TK.t().reshape(-1)  # R = K*T routes, slot-major
    active_R = decision.active_TK.t().reshape(-1)
    order_R = None
    if capacity_factor is not None and drop_policy == "probs":
        weights_R = decision.weights_TK.detach().t().reshape(-1).masked_fill(~active_R, -math.inf)
        slot_R = torch.arange(K, device=ids_R.device).repeat_interleave(T)
        # Lexicographic sort by (slot, -weight) with two stable sorts: slot-major, highest weight first in a slot.
        by_weight_R = torch.argsort(weights_R, descending=True, stable=True)
        order_R = by_weight_R[torch.argsort(slot_R[by_weight_R], stable=True)]
        ids_R, active_R = ids_R[order_R], active_R[order_R]
    onehot_RE = torch.nn.functional.one_hot(ids_R, E) * active_R.unsqueeze(-1)
    location_R = (onehot_RE.cumsum(dim=0) - 1).gather(1, ids_R.unsqueeze(-1)).squeeze(-1)
    if order_R is not None:
        location_R = torch.empty_like(location_R).scatter_(0, order_R, location_R)
        active_R = decision.active_TK.t().reshape(-1)
    if capacity_factor is None:
        capacity = int(onehot_RE.sum(dim=0).max().item()) if onehot_RE.numel() else 0
    else:
        routes = T * K if decision.all_active else int(active_R.sum().item())  # fixed k: known without the device
        capacity = max(1, math.ceil(capacity_factor * routes / E))
    kept_R = active_R & (location_R < capacity)
    return SlotAssignment(kept_R.view(K, T).t(), location_R.view(K, T).t(), capacity)
