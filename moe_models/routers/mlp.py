"""MLP router (router-architectures report, III-B4): Linear(D, H) -> GELU -> Linear(H, E) scores, then top-k."""
from __future__ import annotations

import torch
from torch import nn

from moe_models.routers import ROUTERS
from moe_models.routers.base import RouterContext, in_fp32
from moe_models.routers.options import MLPOptions
from moe_models.routers.topk import TopKRouter


def feature_mlp(d_in: int, hidden: int, d_out: int) -> nn.Sequential:
    """Linear -> GELU -> Linear, shared by the MLP and MLP-Hadamard routers."""
    return nn.Sequential(nn.Linear(d_in, hidden), nn.GELU(), nn.Linear(hidden, d_out))


@ROUTERS.register("mlp")
class MLPRouter(TopKRouter):
    Options = MLPOptions

    def __init__(self, ctx: RouterContext, options: MLPOptions):
        super().__init__(ctx, options)
        del self.proj  # the MLP replaces the linear scorer
        self.mlp = feature_mlp(ctx.d_model, options.hidden, ctx.num_experts)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return in_fp32(self.mlp, x_TD)
