"""Squared-usage balancing: E * sum_i f_i^2 = 1 + CV^2(f), 1 when balanced, E when collapsed.

f itself has no gradient (it counts discrete choices), so, as Shazeer et al. 2017's importance loss does, the
trainable form uses the soft usage P_i (mean router probability): E * sum_i P_i^2 = 1 + CV^2(P), which equals
E * sum_i f_i^2 whenever P matches the hard usage.
"""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES, MICRO_BATCH, BalanceScope
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("squared_usage")
def squared_usage_loss(decision: RoutingDecision, scope: BalanceScope = MICRO_BATCH) -> torch.Tensor:
    del scope  # the soft usage of this micro-batch: no scope to count over
    P_E = decision.probs_TE.mean(dim=0)
    return decision.num_experts * P_E.square().sum()
