"""Self-supervised router (router-architectures report, X-1): a feature extractor phi trained by a contrastive pretext
task, and a linear routing head on its features, then top-k.

  z = phi(x) = W2 GELU(W1 x);  logits = W_r z
  L_ssl = InfoNCE over N sampled tokens (SimCSE, Gao et al. 2021, arXiv 2104.08821): two dropout views of each token
          are a positive pair, the other tokens of the sample are negatives, cosine similarity / temperature.

The pretext loss sees detached hidden states: it shapes the router's features, not the backbone. It is added to the
training loss through `router_losses["contrastive"]`, scaled by `contrastive_weight`.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_models.routers import ROUTERS
from moe_models.routers.base import RouterContext, in_fp32
from moe_models.routers.mlp import feature_mlp
from moe_models.routers.options import SelfSupervisedOptions
from moe_models.routers.topk import TopKRouter
from moe_models.routing import RoutingDecision


def info_nce(view_a_ND: torch.Tensor, view_b_ND: torch.Tensor, temperature: float) -> torch.Tensor:
    """Cross-entropy of each row's positive (the diagonal) against the other rows, in both directions."""
    a, b = F.normalize(view_a_ND, dim=-1), F.normalize(view_b_ND, dim=-1)
    logits_NN = a @ b.t() / temperature
    labels = torch.arange(len(a), device=a.device)
    return 0.5 * (F.cross_entropy(logits_NN, labels) + F.cross_entropy(logits_NN.t(), labels))


@ROUTERS.register("self_supervised")
class SelfSupervisedRouter(TopKRouter):
    Options = SelfSupervisedOptions
    options: SelfSupervisedOptions

    def __init__(self, ctx: RouterContext, options: SelfSupervisedOptions):
        super().__init__(ctx, options)
        del self.proj
        self.features = feature_mlp(ctx.d_model, options.hidden, options.hidden)
        self.head = torch.nn.Linear(options.hidden, ctx.num_experts, bias=False)

    def expert_logits(self, x_TD: torch.Tensor) -> torch.Tensor:
        return in_fp32(self.head, in_fp32(self.features, x_TD))

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        decision = super().forward(x_TD, token_ids_T)
        opts = self.options
        if self.training and opts.contrastive_weight > 0 and len(x_TD) > 1:
            x_ND = x_TD.detach().float()
            if len(x_TD) > opts.contrastive_tokens:  # else all of them: InfoNCE does not depend on the rows' order
                # (and inductor cannot compile indexing by a full-length randperm, torch 2.13)
                x_ND = x_ND[torch.randperm(len(x_TD), device=x_TD.device)[:opts.contrastive_tokens]]
            views = [in_fp32(self.features, F.dropout(x_ND, opts.view_dropout, training=True)) for _ in range(2)]
            decision.router_losses["contrastive"] = opts.contrastive_weight * info_nce(*views, opts.temperature)
        return decision
