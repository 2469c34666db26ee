"""Hybrid router (router-architectures report, III-B5): lambda * linear logits + (1 - lambda) * attention logits,
with lambda = sigmoid(a) learned (or fixed when `learn_mix` is false)."""
from __future__ import annotations

import math

import torch

from moe_models.routers.attention import ExpertKeyScorer
from moe_models.routers import ROUTERS
from moe_models.routers.base import RouterContext
from moe_models.routers.options import HybridOptions
from moe_models.routers.topk import TopKRouter


@ROUTERS.register("hybrid")
class HybridRouter(TopKRouter):
    Options = HybridOptions

    def __init__(self, ctx: RouterContext, options: HybridOptions):
        super().__init__(ctx, options)
        self.attn = ExpertKeyScorer(ctx.d_model, ctx.num_experts, options.d_key)
        # Shape (1,), not a scalar: DeepSpeed's engine cannot broadcast 0-dim parameters across ranks.
        logit = torch.tensor([math.log(options.mix / (1 - options.mix))])
        self.mix_logit = torch.nn.Parameter(logit, requires_grad=options.learn_mix)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        lam = torch.sigmoid(self.mix_logit.float())
        return lam * super().expert_logits(x_TD) + (1 - lam) * self.attn(x_TD)
