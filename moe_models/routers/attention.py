"""Attention router (router-architectures report, III-B3): tokens are queries, learned expert embeddings are keys;
logits = (W_q x) . k_e / sqrt(d_key), then top-k."""
from __future__ import annotations

import math

import torch
from torch import nn

from moe_models.routers import ROUTERS
from moe_models.routers.base import RouterContext, in_fp32
from moe_models.routers.options import AttentionOptions
from moe_models.routers.topk import TopKRouter


class ExpertKeyScorer(nn.Module):
    def __init__(self, d_model: int, num_experts: int, d_key: int):
        super().__init__()
        self.query = nn.Linear(d_model, d_key, bias=False)
        self.keys_ED = nn.Parameter(torch.randn(num_experts, d_key) * 0.02)
        self.scale = 1.0 / math.sqrt(d_key)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return in_fp32(self.query, x_TD) @ self.keys_ED.float().t() * self.scale


@ROUTERS.register("attention")
class AttentionRouter(TopKRouter):
    Options = AttentionOptions

    def __init__(self, ctx: RouterContext, options: AttentionOptions):
        super().__init__(ctx, options)
        del self.proj
        self.attn = ExpertKeyScorer(ctx.d_model, ctx.num_experts, options.d_key)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.attn(x_TD)
