"""Hash routing (Roller et al. 2021, arXiv 2106.04426): a fixed token-id -> expert table, no parameters.

The table is a seeded random lookup drawn once per layer and stored as a buffer, so checkpoints
carry it and every rank agrees on it. The balanced (frequency-aware) table is part of the router zoo issue.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_models.routers.base import ROUTERS, Router, RouterContext, RouterOptions
from moe_models.routing import RoutingDecision


class HashOptions(RouterOptions):
    pass


@ROUTERS.register("hash")
class HashRouter(Router):
    Options = HashOptions

    def __init__(self, ctx: RouterContext, options: HashOptions):
        super().__init__(ctx, options)
        # Seeded per layer so different layers hash differently, identically on every rank and every run.
        gen = torch.Generator().manual_seed(1_000_003 * ctx.seed + ctx.layer_index)
        self.register_buffer("table_V", torch.randint(ctx.num_experts, (ctx.vocab_size,), generator=gen))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        expert_ids_TK = self.table_V[token_ids_T].unsqueeze(-1)
        probs_TE = F.one_hot(expert_ids_TK[:, 0], self.ctx.num_experts).float()
        weights_TK = torch.ones(expert_ids_TK.shape, dtype=torch.float32, device=x_TD.device)
        active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        return RoutingDecision(expert_ids_TK, weights_TK, active_TK, probs_TE, logits_TE=None)
