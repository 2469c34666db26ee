"""Learned top-k router (Shazeer et al. 2017; Switch k=1, GShard/Mixtral k=2) with a linear scorer.

Other scorer architectures subclass it and override `expert_logits` only; selection, jitter, score function and
renormalization stay here.
"""
from __future__ import annotations

from typing import Literal

import torch
from pydantic import NonNegativeFloat, PositiveInt, field_validator, model_validator

from moe_models.assignment import ASSIGNMENTS
from moe_models.fp32_state import Fp32Buffers
from moe_models.routers.base import ROUTERS, LinearScoreRouter, RouterOptions
from moe_models.routing import RoutingDecision


class TopKOptions(RouterOptions):
    k: PositiveInt = 1
    score: Literal["softmax", "sigmoid"] = "softmax"
    # Renormalizing the k selected weights to sum to 1 (Mixtral) removes the router's gradient through the
    # weights when k=1, so it is off by default (Switch uses the raw probability).
    renormalize: bool = False
    jitter: NonNegativeFloat = 0.0  # multiplicative input noise U(1-eps, 1+eps) at training (Switch)
    # Aux-loss-free balancing (Wang et al. 2024, arXiv 2408.15664): a per-expert bias added to the scores for
    # *selection only*, moved by this rate u after each optimizer step (moe_models/expert_bias.py). 0 = off.
    expert_bias_rate: NonNegativeFloat = 0.0
    # How scores become choices (moe_models/assignment): greedy top-k, Sinkhorn (S-BASE) or BASE balanced
    # assignment at training; every method is greedy at evaluation.
    assignment: str = "greedy"

    @field_validator("assignment")
    @classmethod
    def _known_assignment(cls, name: str) -> str:
        ASSIGNMENTS.get(name)  # raises with the valid names
        return name

    @model_validator(mode="after")
    def _one_balancer_in_selection(self) -> "TopKOptions":
        if self.expert_bias_rate > 0 and self.assignment != "greedy":
            raise ValueError(f"expert_bias_rate and assignment={self.assignment!r} both rewrite the selection; "
                             "pick one")
        if self.assignment == "base" and self.k != 1:
            raise ValueError(f"assignment='base' is top-1 (BASE layers); got k={self.k}")
        return self

    def max_experts_per_token(self, num_experts: int) -> int:
        return self.k


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
            if self.training:
                self.step_counts_E += torch.bincount(expert_ids_TK.flatten(), minlength=self.ctx.num_experts)
        else:
            expert_ids_TK = ASSIGNMENTS.get(opts.assignment)(logits_TE.detach(), opts.k, self.training)
            weights_TK = scores_TE.gather(1, expert_ids_TK)
        if opts.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        return RoutingDecision(expert_ids_TK, weights_TK, active_TK, probs_TE, logits_TE, all_active=True)

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
