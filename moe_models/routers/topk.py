"""Learned top-k router (Shazeer et al. 2017; Switch k=1, GShard/Mixtral k=2) with a linear scorer, and the options
today's open MoE models add to it: sigmoid / sqrt-softplus scores, group-limited selection and a routed scaling
factor (DeepSeek-V3/V4), a learned logit bias (GPT-OSS), and two selection biases for balance, the sign step (expert
bias) and its closed-form solution (Quantile Balancing), and null experts (MoE++).

Other scorer architectures subclass it and override `expert_logits` only; selection, jitter, score function and
renormalization stay here.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.assignment import ASSIGNMENTS
from moe_models.fp32_state import Fp32Buffers
from moe_models.routers import ROUTERS
from moe_models.routers.base import LinearScoreRouter
from moe_models.routers.options import TopKOptions
from moe_models.routing import RoutingDecision


def scores_and_probs(logits_TE: torch.Tensor, score: str) -> tuple[torch.Tensor, torch.Tensor]:
    """(the gate's scores, a distribution over experts for the analytics and losses)."""
    if score == "softmax":
        probs_TE = logits_TE.softmax(dim=-1)
        return probs_TE, probs_TE
    # sqrt(softplus): DeepSeek-V4 (transformers' SqrtSoftplusActivation); sigmoid: DeepSeek-V3
    scores_TE = F.softplus(logits_TE).sqrt() if score == "sqrt_softplus" else logits_TE.sigmoid()
    return scores_TE, scores_TE / scores_TE.sum(dim=-1, keepdim=True)


def group_limited(choice_TE: torch.Tensor, n_group: int, topk_group: int) -> torch.Tensor:
    """`choice_TE` with every expert outside a token's topk_group best groups at -inf; a group's score is the sum of
    its two best choices (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2; transformers' DeepseekV3TopkRouter)."""
    T, E = choice_TE.shape
    grouped_TGX = choice_TE.view(T, n_group, E // n_group)
    group_scores_TG = grouped_TGX.topk(min(2, E // n_group), dim=-1).values.sum(dim=-1)
    kept_TG = torch.zeros_like(group_scores_TG, dtype=torch.bool)
    kept_TG.scatter_(1, group_scores_TG.topk(topk_group, dim=-1).indices, True)
    return choice_TE.masked_fill(~kept_TG.repeat_interleave(E // n_group, dim=1), float("-inf"))


def quantile_bias(scores_TE: torch.Tensor, bias_E: torch.Tensor, k: int) -> torch.Tensor:
    """The selection bias under which each expert takes k*T/E of these tokens, given each token's current (k+1)-th
    choice: one dual coordinate-descent step (Megatron-Core `qb_dual_update`; Su 2026). Megatron subtracts its beta
    from the scores; here the bias is added, so this returns -beta."""
    T, E = scores_TE.shape
    cutoff_T1 = (scores_TE + bias_E).topk(k + 1, dim=1).values[:, -1:]  # alpha: the best choice a token leaves out
    per_expert = T * k // E  # Megatron asserts T*k divisible by E; the floor is the nearest capacity below
    return -(scores_TE - cutoff_T1).topk(per_expert + 1, dim=0).values[-1]


@ROUTERS.register("topk")
class TopKRouter(LinearScoreRouter, Fp32Buffers):
    Options = TopKOptions
    options: TopKOptions
    fp32_buffers = ("expert_bias_E", "step_counts_E", "quantile_sum_E", "quantile_count")  # accumulators

    def __init__(self, ctx, options: TopKOptions):
        super().__init__(ctx, options)
        # Saved in checkpoints (a resumed run must keep its bias); counts live for one optimizer step only.
        self.register_buffer("expert_bias_E", torch.zeros(ctx.num_experts))
        self.register_buffer("step_counts_E", torch.zeros(ctx.num_experts), persistent=False)
        self.register_buffer("quantile_sum_E", torch.zeros(ctx.num_experts), persistent=False)
        self.register_buffer("quantile_count", torch.zeros(1), persistent=False)  # 1-dim: DeepSpeed broadcasts no scalars
        choices = ctx.num_experts + options.null_experts
        # Null experts are scored by their own rows, so that any scorer architecture (MLP, attention) gets them.
        self.null_proj = nn.Linear(ctx.d_model, options.null_experts, bias=False) if options.null_experts else None
        if self.null_proj is not None:
            nn.init.normal_(self.null_proj.weight, std=0.02)
        self.logit_bias_E = nn.Parameter(torch.zeros(choices)) if options.router_bias else None
        for problem in options.layer_problems(ctx.num_experts):
            raise ValueError(f"{problem[0]}: {problem[1]}")
        # Whether expert_bias_E moves the selection: a balancing rule trains it, or a swapped checkpoint brought one
        # (DeepSeek-V3's e_score_correction_bias, moe_models/pretrained/router_swap.py).
        self.selection_bias = options.biased_selection
        self.replay = None  # a RouterReplay (moe_models/router_replay.py) records or forces the selection

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        opts = self.options
        if self.training and opts.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1 - opts.jitter, 1 + opts.jitter)
        # Router architectures (attention, MLP, hybrid, MLP-Hadamard) override expert_logits only.
        logits_TE = self.expert_logits(x_TD.float())
        if self.null_proj is not None:  # E real + N null choices
            logits_TE = torch.cat([logits_TE, F.linear(x_TD.float(), self.null_proj.weight.float())], dim=-1)
        if self.logit_bias_E is not None:
            logits_TE = logits_TE + self.logit_bias_E.float()
        if opts.force_uniform:  # N(0, 1) forward, identity backward (Megatron's RandomSTE)
            logits_TE = logits_TE + (torch.randn_like(logits_TE) - logits_TE).detach()
        scores_TE, probs_TE = scores_and_probs(logits_TE, opts.score)
        expert_ids_TK = self.select(scores_TE.detach(), logits_TE.detach())
        if self.replay is not None:  # recorded, or replaced by the recording; the gates below stay this router's
            expert_ids_TK = self.replay.select(self.ctx.layer_index, expert_ids_TK)
        weights_TK = scores_TE.gather(1, expert_ids_TK)  # gate values: the unbiased scores
        if opts.renormalize:
            weights_TK = weights_TK / weights_TK.sum(dim=-1, keepdim=True)
        if opts.routed_scaling_factor != 1.0:
            weights_TK = weights_TK * opts.routed_scaling_factor
        if self.null_proj is not None:
            return self.without_null_routes(expert_ids_TK, weights_TK, probs_TE, logits_TE)
        active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        decision = RoutingDecision(expert_ids_TK, weights_TK, active_TK, probs_TE, logits_TE, all_active=True)
        if self.training and opts.expert_bias_rate > 0:
            self.step_counts_E += decision.routes_per_expert_E()
        if self.training and opts.quantile_balancing and torch.is_grad_enabled():
            self.quantile_sum_E += quantile_bias(scores_TE.detach(), self.expert_bias_E, opts.k)
            self.quantile_count += 1
        return decision

    def without_null_routes(self, expert_ids_TK, weights_TK, probs_TE, logits_TE) -> RoutingDecision:
        """A route to a null expert becomes an inactive slot (no output, no compute; MoE++'s zero expert), keeping
        the weights of the real routes as they were. The distribution the losses and analytics see is the one over
        the real experts, renormalized; null routes count nowhere as load."""
        E = self.ctx.num_experts
        real_TK = expert_ids_TK < E
        real_probs_TE = probs_TE[:, :E]
        return RoutingDecision(expert_ids_TK.masked_fill(~real_TK, 0), weights_TK * real_TK, real_TK,
                               real_probs_TE / real_probs_TE.sum(dim=-1, keepdim=True), logits_TE[:, :E])

    def select(self, scores_TE: torch.Tensor, logits_TE: torch.Tensor) -> torch.Tensor:
        """Each token's k experts: by score plus the selection bias, within its groups; or by a balanced assignment
        at training (moe_models/assignment)."""
        opts = self.options
        if not self.selection_bias and opts.n_group == 1:
            return ASSIGNMENTS.get(opts.assignment)(logits_TE, opts.k, self.training)
        choice_TE = scores_TE + self.expert_bias_E if self.selection_bias else scores_TE
        if opts.n_group > 1:
            choice_TE = group_limited(choice_TE, opts.n_group, opts.topk_group or opts.n_group)
        return choice_TE.topk(opts.k, dim=-1).indices

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        """Moves the selection bias once per optimizer step, with the whole global batch's counts."""
        if self.options.quantile_balancing:
            self._solve_quantile_bias()
        elif self.options.expert_bias_rate > 0:
            self._step_expert_bias()

    def _step_expert_bias(self) -> None:
        """b_i += u * sign(mean(c) - c_i), then re-centred (Wang et al. 2024)."""
        counts_E = self.step_counts_E.clone()
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts_E)  # the router is replicated on every rank: global-batch counts
        self.expert_bias_E += self.options.expert_bias_rate * torch.sign(counts_E.mean() - counts_E)
        self.expert_bias_E -= self.expert_bias_E.mean()
        self.step_counts_E.zero_()

    def _solve_quantile_bias(self) -> None:
        """b = ema * b + (1 - ema) * mean over micro-batches and ranks of their solutions, re-centred (Megatron's
        _update_router_qb_beta). A step without a training forward keeps the bias; decided on the device, without
        reading the count back to the host."""
        solved_E = self.quantile_sum_E / self.quantile_count.clamp(min=1)
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(solved_E)
            solved_E /= torch.distributed.get_world_size()
        ema = self.options.quantile_ema
        updated_E = ema * self.expert_bias_E + (1 - ema) * solved_E
        updated_E -= updated_E.mean()
        self.expert_bias_E.copy_(torch.where(self.quantile_count > 0, updated_E, self.expert_bias_E))
        self.quantile_sum_E.zero_()
        self.quantile_count.zero_()
