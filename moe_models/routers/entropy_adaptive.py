"""Entropy-adaptive k: each token gets as many experts as its router distribution is uncertain.

Rules (`rule`):
- normalized (default; report 003, "Dynamic routing in GPT-2 MoE", §III-F): the router entropy normalized to [0, 1]
  by log E, mapped linearly onto [min_k, max_k] and rounded: k_t = round(min_k + H(p_t) / log E · (max_k − min_k)).
- perplexity (our earlier construction): k_t = clip(ceil(exp H(p_t)), min_k, max_k), exp(H) being the effective number
  of experts the distribution spreads over. It saturates at max_k whenever the router is near uniform (exp H ≈ E),
  which is where a freshly initialized or upcycled router sits.
The k_t most probable experts are selected, weights are their probabilities renormalized over the selection.
"""
from __future__ import annotations

import math

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.compute_target import ComputeTarget
from moe_models.routers.options import EntropyAdaptiveOptions
from moe_models.routing import RoutingDecision


def adaptive_k(probs_TE: torch.Tensor, min_k: int, max_k: int, rule: str = "normalized",
               entropy_scale: float = 1.0) -> torch.Tensor:
    """entropy_scale (1 unless calibrated: moe_models/routers/calibration.py) multiplies the entropy term."""
    entropy_T = -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1)
    if rule == "perplexity":
        return (entropy_scale * entropy_T.exp()).ceil().clamp(min_k, max_k).long()
    normalized_T = entropy_T / math.log(probs_TE.shape[-1])  # report 003: decoupled from E
    return (min_k + (entropy_scale * normalized_T).clamp(0.0, 1.0) * (max_k - min_k)).round().long()


@ROUTERS.register("entropy_adaptive")
class EntropyAdaptiveRouter(ComputeTarget, LinearScoreRouter):
    Options = EntropyAdaptiveOptions
    options: EntropyAdaptiveOptions

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        logits_TE = self.expert_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        top_TK, ids_TK = probs_TE.topk(self.options.max_k, dim=-1)
        o = self.options
        k_T = adaptive_k(probs_TE.detach(), o.min_k, o.max_k, o.rule, o.entropy_scale)
        active_TK = torch.arange(self.options.max_k, device=x_TD.device) < k_T.unsqueeze(-1)
        kept_TK = top_TK * active_TK
        weights_TK = kept_TK / kept_TK.sum(-1, keepdim=True)
        return RoutingDecision(ids_TK, weights_TK, active_TK, probs_TE, logits_TE)
