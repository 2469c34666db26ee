"""Switch load-balancing loss (Fedus et al. 2021, eq. 4): E * sum_i f_i * P_i.

f_i is the fraction of routes sent to expert i (no gradient), P_i the mean router probability of expert i.
Normalization follows Megatron's switch_load_balancing_loss_func: f counts routes / (K*T), so the loss is exactly 1
under perfectly balanced routing for any K (HF's load_balancing_loss_func divides by T only and gives K there; it
also pools all layers, while we compute per layer). With variable experts per token K*T becomes the route count.

Scope (Qiu et al. 2025, arXiv 2501.11873): "micro_batch" counts f over this micro-batch; "sequence" computes the
loss per sequence and averages (DeepSeek's sequence-wise form); "global_batch" takes f from route counts all-reduced
over data-parallel ranks and accumulated over the micro-batches of the optimizer step (Megatron's global_aux_loss),
while P stays local so gradients flow through this rank's probabilities only.
"""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES, MICRO_BATCH, BalanceScope
from moe_models.balancing.sequence_lbl import sequence_load_balancing_loss
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("switch_lbl")
def switch_load_balancing_loss(decision: RoutingDecision, scope: BalanceScope = MICRO_BATCH) -> torch.Tensor:
    if scope.kind == "sequence":  # the switch loss per sequence, averaged: DeepSeek's sequence-wise form
        return sequence_load_balancing_loss(decision, scope)
    if scope.kind == "global_batch" and scope.window_routes_E is not None:
        routes_E = scope.window_routes_E
    else:
        routes_E = decision.routes_per_expert_E().detach()
    f_E = routes_E / routes_E.sum().clamp(min=1.0)
    P_E = decision.probs_TE.mean(dim=0)
    return decision.num_experts * (f_E * P_E).sum()
