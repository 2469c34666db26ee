"""Expert-choice routing (Zhou et al. 2022, arXiv 2202.09368): experts pick their top tokens, not tokens their experts.

S = softmax(X W_g) over experts; each expert takes the c*T/E tokens with the highest S[:, e] (c = `capacity`,
the average experts per token). Load is balanced by construction; a token may get zero or up to E experts.

Non-causal: whether a token is picked depends on every other token of the batch, future positions included, so in an
autoregressive decoder it leaks the future. The study refuses it in such a model unless the router entry says
`allow_non_causal: true` (workflows/study/schema.py).
"""
from __future__ import annotations

import math

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.options import ExpertChoiceOptions
from moe_models.routing import RoutingDecision


@ROUTERS.register("expert_choice")
class ExpertChoiceRouter(LinearScoreRouter):
    Options = ExpertChoiceOptions
    options: ExpertChoiceOptions

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        logits_TE = self.expert_logits(x_TD)
        probs_TE = logits_TE.softmax(dim=-1)
        T, E = probs_TE.shape
        per_expert = min(T, max(1, math.ceil(self.options.capacity * T / E)))
        picked_ET = probs_TE.t().topk(per_expert, dim=-1).indices  # each expert's top tokens
        chosen_TE = torch.zeros(T, E, dtype=torch.bool, device=x_TD.device)
        chosen_TE.scatter_(0, picked_ET.t(), True)
        # Slot e of every token is expert e: K = E slots, active where expert e picked the token.
        expert_ids_TK = torch.arange(E, device=x_TD.device).expand(T, E).contiguous()
        weights_TK = probs_TE * chosen_TE
        return RoutingDecision(expert_ids_TK, weights_TK, chosen_TE, probs_TE, logits_TE)
