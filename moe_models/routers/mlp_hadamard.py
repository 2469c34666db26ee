"""MLP-Hadamard router (router-architectures report, III-B6): an MLP's features gate the token's own features
elementwise before the expert projection: logits = W_o (MLP(x) * x), then top-k."""
from __future__ import annotations

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import RouterContext, in_fp32
from moe_models.routers.mlp import feature_mlp
from moe_models.routers.options import MLPHadamardOptions
from moe_models.routers.topk import TopKRouter


@ROUTERS.register("mlp_hadamard")
class MLPHadamardRouter(TopKRouter):
    Options = MLPHadamardOptions

    def __init__(self, ctx: RouterContext, options: MLPHadamardOptions):
        super().__init__(ctx, options)  # self.proj is the output projection W_o
        self.mlp = feature_mlp(ctx.d_model, options.hidden, ctx.d_model)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return super().expert_logits(in_fp32(self.mlp, x_TD) * x_TD)
