"""Router z-loss (Zoph et al. 2022, ST-MoE eq. 5): mean over tokens of logsumexp(logits)^2."""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("z_loss")
def router_z_loss(decision: RoutingDecision) -> torch.Tensor:
    if decision.logits_TE is None:  # parameter-free routers have no logits to keep small
        return decision.probs_TE.new_zeros(())
    return torch.logsumexp(decision.logits_TE.float(), dim=-1).square().mean()
