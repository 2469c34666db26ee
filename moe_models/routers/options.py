"""Every router's options, as a study file writes them: torch-free, so validating a study imports no torch.

Each class is registered under its router's name; the router itself is `moe_models/routers/<name>.py` (it sets
`Options` to its class here). What the validator must know about a router without building it lives here too, as


class variables: whether it is causal, whether it routes by the domain label.
"""
from __future__ import annotations

from typing import ClassVar, Literal

from pydantic import NonNegativeFloat, PositiveFloat, PositiveInt, confloat, field_validator, model_validator

from moe_models.assignment import ASSIGNMENTS
from moe_models.options import StrictOptions
from moe_models.registry import Registry


class RouterOptions(StrictOptions):
    # Routers that route by the document's domain label (the reference router) get `domain_ids_T` as a third
    # argument; the rest never see labels.
    needs_domains: ClassVar[bool] = False
    # Causal routers decide a token's experts from that token alone; a non-causal one (expert choice) looks at the
    # whole batch, which leaks future tokens in an autoregressive model.
    causal: ClassVar[bool] = True
    min_experts_per_token: ClassVar[int] = 1  # 0 where a token may be left unrouted (expert choice)
    # Every token gets the same number of experts (experts/token and its spread are then constant by construction).
    fixed_k: ClassVar[bool] = True
    # Routes by a learned score (a fixed table routes with one-hot probabilities: zero entropy by construction).
    learned: ClassVar[bool] = True

    def max_experts_per_token(self, num_experts: int) -> int:
        """Upper bound on experts per token in a layer of `num_experts`; the study validator checks it fits."""
        return 1


ROUTER_OPTIONS: Registry[type[RouterOptions]] = Registry("router")


# --- topk
@ROUTER_OPTIONS.register("topk")
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
        ASSIGNMENTS.check(name)  # raises with the valid names
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


# --- attention
@ROUTER_OPTIONS.register("attention")
class AttentionOptions(TopKOptions):
    d_key: PositiveInt = 32


# --- entropy_adaptive
@ROUTER_OPTIONS.register("entropy_adaptive")
class EntropyAdaptiveOptions(RouterOptions):
    fixed_k: ClassVar[bool] = False
    min_k: PositiveInt = 1
    max_k: PositiveInt = 2
    # normalized: report 003's rule, entropy / log E mapped linearly onto [min_k, max_k]; perplexity: ceil(exp H)
    rule: Literal["normalized", "perplexity"] = "normalized"

    @model_validator(mode="after")
    def _order(self) -> "EntropyAdaptiveOptions":
        if self.min_k > self.max_k:
            raise ValueError(f"min_k={self.min_k} must be <= max_k={self.max_k}")
        return self

    def max_experts_per_token(self, num_experts: int) -> int:
        return self.max_k


# --- expert_choice
@ROUTER_OPTIONS.register("expert_choice")
class ExpertChoiceOptions(RouterOptions):
    fixed_k: ClassVar[bool] = False
    causal: ClassVar[bool] = False  # each expert picks its tokens from the whole batch
    min_experts_per_token: ClassVar[int] = 0  # a token no expert picks is left unrouted
    capacity: PositiveFloat = 1.0  # c: tokens per expert = c * T / E (mean experts per token = c)

    def max_experts_per_token(self, num_experts: int) -> int:
        return num_experts


# --- hash
@ROUTER_OPTIONS.register("hash")
class HashOptions(RouterOptions):
    learned: ClassVar[bool] = False
    table: Literal["random", "balanced"] = "random"
    k: PositiveInt = 1

    def max_experts_per_token(self, num_experts: int) -> int:
        return self.k


# --- hybrid
@ROUTER_OPTIONS.register("hybrid")
class HybridOptions(TopKOptions):
    d_key: PositiveInt = 32
    mix: confloat(gt=0, lt=1) = 0.5  # initial lambda
    learn_mix: bool = True


# --- mlp
@ROUTER_OPTIONS.register("mlp")
class MLPOptions(TopKOptions):
    hidden: PositiveInt = 64


# --- mlp_hadamard
@ROUTER_OPTIONS.register("mlp_hadamard")
class MLPHadamardOptions(MLPOptions):
    pass


# --- reference
@ROUTER_OPTIONS.register("reference")
class ReferenceOptions(RouterOptions):
    learned: ClassVar[bool] = False
    needs_domains: ClassVar[bool] = True
    def max_experts_per_token(self, num_experts: int) -> int:
        return 1  # B is only known with the dataset's domains; at most num_experts // num_domains


# --- self_supervised
@ROUTER_OPTIONS.register("self_supervised")
class SelfSupervisedOptions(TopKOptions):
    hidden: PositiveInt = 64  # width of phi
    contrastive_weight: NonNegativeFloat = 0.1
    temperature: PositiveFloat = 0.1
    view_dropout: confloat(gt=0, lt=1) = 0.1  # the augmentation that makes the two views differ
    contrastive_tokens: PositiveInt = 256  # tokens sampled per forward for InfoNCE (N x N similarities)


# --- top_any
@ROUTER_OPTIONS.register("top_any")
class TopAnyOptions(RouterOptions):
    fixed_k: ClassVar[bool] = False
    tau: PositiveFloat = 10.0  # temperature of the cosine similarity
    init_threshold: float = 0.0  # G_e at initialization (threshold sigmoid(tau*G_e))
    diversity_loss: NonNegativeFloat = 0.0  # ||W^T W - I||_F on normalized expert embeddings
    simplicity_loss: NonNegativeFloat = 0.0  # mean ||w_e||

    def max_experts_per_token(self, num_experts: int) -> int:
        return num_experts


# --- top_p
@ROUTER_OPTIONS.register("top_p")
class TopPOptions(RouterOptions):
    fixed_k: ClassVar[bool] = False
    p: confloat(gt=0, le=1) = 0.4
    max_k: PositiveInt | None = None
    entropy_loss: NonNegativeFloat = 0.0

    def max_experts_per_token(self, num_experts: int) -> int:
        return min(self.max_k or num_experts, num_experts)
