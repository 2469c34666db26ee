"""Reference router (routing testbed, Falke et al. 2026): routes each token by its document's domain label to a
prescribed block of experts — the routing upper bound a learned router is measured against.

Domain d owns experts [d*B, (d+1)*B) with B = num_experts // num_domains; every token goes to all B experts of its
domain with equal weight 1/B (k = B). Experts beyond num_domains*B stay unused. Needs a dataset with domain labels.
"""
from __future__ import annotations

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import Router, RouterContext
from moe_models.routers.options import ReferenceOptions
from moe_models.routing import RoutingDecision


@ROUTERS.register("reference")
class ReferenceRouter(Router):
    Options = ReferenceOptions

    def __init__(self, ctx: RouterContext, options: ReferenceOptions):
        super().__init__(ctx, options)
        if ctx.num_domains < 1:
            raise ValueError("the reference router routes by domain label, but the dataset has none")
        if ctx.num_experts < ctx.num_domains:
            raise ValueError(f"the reference router needs num_experts >= domains ({ctx.num_domains}), "
                             f"got {ctx.num_experts}")
        self.block = ctx.num_experts // ctx.num_domains

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor, domain_ids_T: torch.Tensor) -> RoutingDecision:
        T, E, B = x_TD.shape[0], self.ctx.num_experts, self.block
        ids_TK = domain_ids_T.unsqueeze(-1) * B + torch.arange(B, device=x_TD.device)
        weights_TK = torch.full((T, B), 1.0 / B, device=x_TD.device)
        probs_TE = torch.zeros(T, E, device=x_TD.device).scatter_(1, ids_TK, 1.0 / B)
        return RoutingDecision(ids_TK, weights_TK, torch.ones_like(ids_TK, dtype=torch.bool), probs_TE, all_active=True)
