"""Top-p routing (Huang et al. 2024, arXiv 2403.07652): per token, the smallest set of most probable experts whose
probability mass reaches p — the expert that crosses p included. Combine weights are the raw probabilities (not
renormalized, as in the paper). Optional cap `max_k`, and the paper's dynamic loss: the router entropy
-sum_e P_e log P_e, minimized with coefficient `entropy_loss` (pushes the router to be confident, i.e. fewer experts).
"""
from __future__ import annotations

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.compute_target import ComputeTarget
from moe_models.routers.options import TopPOptions
from moe_models.routing import RoutingDecision


def top_p_mask(probs_TE: torch.Tensor, p: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(sorted expert ids, keep mask) for the minimal prefix whose mass reaches p."""
    sorted_TE, ids_TE = probs_TE.sort(dim=-1, descending=True)
    mass_before_TE = sorted_TE.cumsum(dim=-1) - sorted_TE  # mass of the experts ranked above
    return ids_TE, mass_before_TE < p  # the first expert always passes (mass before = 0 < p)


@ROUTERS.register("top_p")
class TopPRouter(ComputeTarget, LinearScoreRouter):
    Options = TopPOptions
    options: TopPOptions

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        logits_TE = self.expert_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        ids_TE, keep_TE = top_p_mask(probs_TE.detach(), self.options.p)
        K = self.options.max_experts_per_token(self.ctx.num_experts)
        ids_TK, active_TK = ids_TE[:, :K], keep_TE[:, :K]
        weights_TK = probs_TE.gather(1, ids_TK) * active_TK
        losses = {}
        if self.options.entropy_loss > 0:
            entropy_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1)
            losses["top_p_entropy"] = self.options.entropy_loss * entropy_T.mean()
        return RoutingDecision(ids_TK, weights_TK, active_TK, probs_TE, logits_TE, losses)
