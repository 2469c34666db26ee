"""Switch load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i.

f_i is the fraction of routes sent to expert i (no gradient), P_i the mean router probability of expert i.
Normalization follows Megatron's switch_load_balancing_loss_func: f counts routes / (K*T), so the loss is exactly 1
under perfectly balanced routing for any K (HF's load_balancing_loss_func divides by T only and gives K there; it
also pools all layers, while we compute per layer). With variable experts per token K*T becomes the route count.
"""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("switch_lbl")
def switch_load_balancing_loss(decision: RoutingDecision) -> torch.Tensor:
    routes_E = decision.tokens_per_expert_E().detach()
    f_E = routes_E / routes_E.sum().clamp(min=1.0)
    P_E = decision.probs_TE.mean(dim=0)
    return decision.num_experts * (f_E * P_E).sum()
