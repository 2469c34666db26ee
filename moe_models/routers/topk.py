"""Learned top-k router (Shazeer et al. 2017; Switch k=1, GShard/Mixtral k=2) with a linear scorer.

Other scorer architectures subclass it and override `expert_logits` only; selection, jitter, score function and
renormalization stay here.
"""
from __future__ import annotations

import torch

from moe_models.assignment import ASSIGNMENTS
from moe_models.fp32_state import Fp32Buffers
from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.options import TopKOptions
from moe_models.routing import RoutingDecision


@ROUTERS.register("topk")
class TopKRouter(LinearScoreRouter, Fp32Buffers):
    Options = TopKOptions
    options: TopKOptions
    fp32_buffers = ("expert_bias_E", "step_counts_E")  # accumulators (fp32_state.py)

    def __init__(self, ctx, options: TopKOptions):
        super().__init__(ctx, options)
        # Saved in checkpoints (a resumed run must keep its bias); counts live for one optimizer step only.
        self.register_buffer("expert_bias_E", torch.zeros(ctx.num_experts))
        self.register_buffer("step_counts_E", torch.zeros(ctx.num_experts), persistent=False)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        opts = self.options
        if self.training and opts.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - opts.jitter, 1 + opts.jitter)
        # Router architectures (attention, MLP, hybrid, MLP-Hadamard) override expert_logits only.
        logits_TE = self.expert_logits(x_TD.float())
        if opts.score == "softmax":
            probs_TE = logits_TE.softmax(dim=-1)
            scores_TE = probs_TE
        else:
            scores_TE = logits_TE.sigmoid()
            probs_TE = scores_TE / scores_TE.sum(dim=-1, keepdim=True)
        if opts.expert_bias_rate > 0:
            expert_ids_TK = (scores_TE.detach() + self.expert_bias_E).topk(opts.k, dim=-1).indices
            weights_TK = scores_TE.gather(1, expert_ids_TK)  # gate values stay the unbiased scores
        else:
            expert_ids_TK = ASSIGNMENTS.get(opts.assignment)(logits_TE.detach(), opts.k, self.training)
            weights_TK = scores_TE.gather(1, expert_ids_TK)
        if opts.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        decision = RoutingDecision(expert_ids_TK, weights_TK, active_TK, probs_TE, logits_TE, all_active=True)
        if opts.expert_bias_rate > 0 and self.training:
            self.step_counts_E += decision.routes_per_expert_E()
        return decision

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """b_i += u * sign(mean(c) - c_i), then re-centred (Wang et al. 2024). Called once per optimizer step."""
        if self.options.expert_bias_rate == 0:
            return
        counts_E = self.step_counts_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)  # the router is replicated on every rank: global-batch counts
        self.expert_bias_E += self.options.expert_bias_rate * torch.sign(counts_E.mean() - counts_E)
        self.expert_bias_E -= self.expert_bias_E.mean()
        self.step_counts_E.zero_()
