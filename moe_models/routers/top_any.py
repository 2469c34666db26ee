"""Top-any gating (DynMoE, Guo et al. 2024; LINs-lab/DynMoE): a token goes to every expert whose score passes that
expert's trainable threshold.

score s_te = sigmoid(tau * cos(x_t, w_e)); gate g_te = 1[s_te > sigmoid(tau * G_e)] with a straight-through
gradient to both w and G; k_t = number of passing experts; combine weights g/k_t. A token that passes no threshold
goes to its argmax expert — DynMoE does this at evaluation; we do it in training too, so no token is ever dropped by
the router (a documented departure). DynMoE's diversity/simplicity auxiliary losses are optional coefficients.
`threshold_offset` (0 unless calibrated: moe_models/routers/calibration.py) shifts every threshold alike.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.routers import ROUTERS
from moe_models.routers.base import Router, RouterContext
from moe_models.routers.compute_target import ComputeTarget
from moe_models.routers.options import TopAnyOptions
from moe_models.routing import RoutingDecision


@ROUTERS.register("top_any")
class TopAnyRouter(ComputeTarget, Router):
    Options = TopAnyOptions
    options: TopAnyOptions

    def __init__(self, ctx: RouterContext, options: TopAnyOptions):
        super().__init__(ctx, options)
        self.expert_emb_ED = nn.Parameter(torch.randn(ctx.num_experts, ctx.d_model) * 0.02)
        self.threshold_E = nn.Parameter(torch.full((ctx.num_experts,), options.init_threshold))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        tau = self.options.tau
        cos_TE = F.normalize(x_TD.float(), dim=-1) @ F.normalize(self.expert_emb_ED.float(), dim=-1).t()
        scores_TE = torch.sigmoid(tau * cos_TE)
        margin_TE = scores_TE - torch.sigmoid(tau * (self.threshold_E.float() + self.options.threshold_offset))
        hard_TE = (margin_TE > 0).float()
        fallback_TE = F.one_hot(scores_TE.argmax(-1), self.ctx.num_experts).float()
        hard_TE = torch.where(hard_TE.sum(-1, keepdim=True) > 0, hard_TE, fallback_TE)
        gate_TE = hard_TE + margin_TE - margin_TE.detach()  # straight-through: forward 0/1, gradient of the margin
        k_T = hard_TE.sum(-1, keepdim=True)
        E = self.ctx.num_experts
        ids_TK = torch.arange(E, device=x_TD.device).expand(x_TD.shape[0], E)
        active_TK = hard_TE.bool()
        weights_TK = gate_TE / k_T * active_TK
        probs_TE = scores_TE / scores_TE.sum(-1, keepdim=True)
        return RoutingDecision(ids_TK, weights_TK, active_TK, probs_TE, tau * cos_TE, self._losses())

    def _losses(self) -> dict[str, torch.Tensor]:
        losses = {}
        if self.options.diversity_loss > 0:
            w_ED = F.normalize(self.expert_emb_ED.float(), dim=-1)
            eye = torch.eye(w_ED.shape[0], device=w_ED.device)
            losses["top_any_diversity"] = self.options.diversity_loss * torch.linalg.norm(w_ED @ w_ED.t() - eye)
        if self.options.simplicity_loss > 0:
            losses["top_any_simplicity"] = self.options.simplicity_loss * self.expert_emb_ED.norm(dim=-1).mean()
        return losses
