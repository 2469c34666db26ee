"""Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2."""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES, MICRO_BATCH, BalanceScope
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("z_loss")
def router_z_loss(decision: RoutingDecision, scope: BalanceScope = MICRO_BATCH) -> torch.Tensor:
    del scope  # a per-token loss: no scope to count over
    if decision.logits_TE is None:  # parameter-free routers have no logits to keep small
        return decision.probs_TE.new_zeros(())
    return torch.logsumexp(decision.logits_TE.float(), dim=-1).square().mean()
