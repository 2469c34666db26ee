"""Entropy-adaptive k: each token gets as many experts as its router distribution is uncertain.

Rule (our construction; no canonical paper): k_t = clip(ceil(exp(H(p_t))), min_k, max_k), where exp(H) is the
perplexity of the router distribution — the effective number of experts it spreads over (1 for a one-hot router,
E for a uniform one). The k_t most probable experts are selected, weights are their probabilities renormalized
over the selection.
"""
from __future__ import annotations

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.options import EntropyAdaptiveOptions
from moe_models.routing import RoutingDecision


def adaptive_k(probs_TE: torch.Tensor, min_k: int, max_k: int) -> torch.Tensor:
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1)
    return entropy_T.exp().ceil().clamp(min_k, max_k).long()


@ROUTERS.register("entropy_adaptive")
class EntropyAdaptiveRouter(LinearScoreRouter):
    Options = EntropyAdaptiveOptions
    options: EntropyAdaptiveOptions

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        logits_TE = self.expert_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, ids_TK = probs_TE.topk(self.options.max_k, dim=-1)
        k_T = adaptive_k(probs_TE.detach(), self.options.min_k, self.options.max_k)
        active_TK = torch.arange(self.options.max_k, device=x_TD.device) < k_T.unsqueeze(-1)
        kept_TK = top_TK * active_TK
        weights_TK = kept_TK / kept_TK.sum(-1, keepdim=True)
        return RoutingDecision(ids_TK, weights_TK, active_TK, probs_TE, logits_TE)
