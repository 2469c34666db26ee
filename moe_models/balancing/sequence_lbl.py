"""DeepSeek sequence-wise balance loss (DeepSeek-V3, eq. 17-20), averaged over the sequences of the batch.

Per sequence: f_i = E / (K*T_seq) * #routes to i, P_i = mean over the sequence of normalized scores s_i/sum_j s_j;
L = sum_i f_i P_i. Balanced routing within every sequence gives 1 (so alpha * L = alpha, like switch_lbl), but a
sequence that sends all its tokens to one expert is penalized even when the batch as a whole is balanced: this is
the narrowest balancing scope.
"""
from __future__ import annotations

import torch

from moe_models.balancing.base import BALANCING_LOSSES, MICRO_BATCH, BalanceScope
from moe_models.routing import RoutingDecision


@BALANCING_LOSSES.register("sequence_lbl")
def sequence_load_balancing_loss(decision: RoutingDecision, scope: BalanceScope = MICRO_BATCH) -> torch.Tensor:
    """Always per sequence, whatever the study's scope: that is what this loss is."""
    S = scope.sequences(decision.probs_TE.shape[0])
    E = decision.num_experts
    routes_BSE = decision.expert_mask_TE().view(-1, S, E)
    f_BE = E * routes_BSE.sum(1) / routes_BSE.sum((1, 2)).clamp(min=1.0).unsqueeze(-1)
    probs_BSE = decision.probs_TE.view(-1, S, E)
    P_BE = (probs_BSE / probs_BSE.sum(-1, keepdim=True).clamp_min(1e-12)).mean(1)
    return (f_BE * P_BE).sum(-1).mean()
