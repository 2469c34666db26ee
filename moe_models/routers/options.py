"""Every router's options, as a study file writes them: torch-free, so validating a study imports no torch.

Each class is registered under its router's name; the router itself is `moe_models/routers/<name>.py` (it sets
`Options` to its class here). What the validator must know about a router without building it lives here too, as


class variables: whether it is causal, whether it routes by the domain label.
"""
from __future__ import annotations

from typing import Annotated, ClassVar, Literal

from pydantic import NonNegativeFloat, NonNegativeInt, PositiveFloat, PositiveInt, confloat, field_validator, model_validator

from moe_models.assignment import ASSIGNMENTS
from moe_models.options import ADDED_LATER, StrictOptions
from moe_models.registry import Registry
from moe_models.routers.calibration import Knob


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
    # A dynamic router's option that sets its experts per token (`moelab calibrate` matches compute with it).
    calibration_knob: ClassVar[Knob | None] = None

    def max_experts_per_token(self, num_experts: int) -> int:
        """Upper bound on experts per token in a layer of `num_experts`; the study validator checks it fits."""
        return 1

    def layer_problems(self, num_experts: int) -> list[tuple[str, str]]:
        """(option, what is wrong) for each option that does not fit a layer of `num_experts` experts."""
        return []


ROUTER_OPTIONS: Registry[type[RouterOptions]] = Registry("router")


class ComputeTargetOptions(RouterOptions):
    """A dynamic router's options that may train at a set compute (moe_models/routers/compute_target.py)."""
    # Train at this many experts per token: after every optimizer step the knob (top-p's p, top-any's
    # threshold_offset, entropy-adaptive's entropy_scale) moves toward the value that spends it. None: it stays as set.
    target_experts_per_token: Annotated[PositiveFloat | None, ADDED_LATER] = None
    # How far the knob moves per step, per expert of gap (in its axis: log for a scale factor).
    target_rate: Annotated[PositiveFloat, ADDED_LATER] = 0.1

    def layer_problems(self, num_experts: int) -> list[tuple[str, str]]:
        problems = super().layer_problems(num_experts)
        target, least = self.target_experts_per_token, getattr(self, "min_k", 1)
        most = self.max_experts_per_token(num_experts)
        if target is not None and not least <= target <= most:
            problems.append(("target_experts_per_token", f"must lie in [{least}, {most}], what this router can "
                                                         f"spend in a layer of {num_experts} experts; not {target:g}"))
        return problems


# --- topk
@ROUTER_OPTIONS.register("topk")
class TopKOptions(RouterOptions):
    k: PositiveInt = 1
    # sigmoid: DeepSeek-V3 (arXiv 2412.19437); sqrt_softplus: sqrt(log(1 + e^x)), DeepSeek-V4 (transformers'
    # SqrtSoftplusActivation, Megatron's "sqrtsoftplus"). Both weight by the raw score, not a softmax over experts.
    score: Literal["softmax", "sigmoid", "sqrt_softplus"] = "softmax"
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
    # Group-limited routing (DeepSeek-V3, arXiv 2412.19437 Sec. 2.1.2; device-limited in DeepSeek-V2): experts in
    # n_group equal groups; a token keeps the topk_group groups whose two best scores sum highest, then picks its
    # k experts there.
    n_group: Annotated[PositiveInt, ADDED_LATER] = 1
    topk_group: Annotated[PositiveInt | None, ADDED_LATER] = None  # groups a token keeps; None = every group
    # DeepSeek-V3's routed scaling factor: the k gate weights (renormalized or not) times a constant.
    routed_scaling_factor: Annotated[PositiveFloat, ADDED_LATER] = 1.0
    # A learned bias on the router's logits (GPT-OSS): trained by gradient and part of the gate weights, unlike the
    # expert bias, which moves selection only.
    router_bias: Annotated[bool, ADDED_LATER] = False
    # Quantile Balancing (Su 2026, kexue.fm/archives/11619; Megatron-Core `quantile_balancing`): the selection bias
    # solved after each optimizer step, per expert, as the score margin at which it would take exactly k*T/E of the
    # step's tokens (Megatron's qb_dual_update), in place of the sign step of expert_bias_rate. EMA of the solution.
    quantile_balancing: Annotated[bool, ADDED_LATER] = False
    quantile_ema: Annotated[confloat(ge=0, lt=1), ADDED_LATER] = 0.0  # weight of the previous bias
    # Uniform random routing for benchmarks (Megatron's force_load_balancing): the logits become N(0, 1) noise, and
    # their gradient passes straight through to the router.
    force_uniform: Annotated[bool, ADDED_LATER] = False
    # Zero-computation experts (MoE++, arXiv 2410.07348; LongCat-Flash): N more choices the router scores beside the
    # real experts. A route to one outputs nothing and costs nothing, so a token may use fewer than k experts: the
    # gate learns how much compute each token needs.
    null_experts: Annotated[NonNegativeInt, ADDED_LATER] = 0
    # DenseMixer (Yao et al. 2025, "Improving MoE post-training with precise router gradients"): the forward stays
    # sparse, but the router's gradient is the dense mixture's, sum over every expert of p_e * E_e(x), with each
    # expert's output computed without gradient (E expert forwards per token at training). Dropless layers only.
    dense_gradient: Annotated[bool, ADDED_LATER] = False

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
        if self.quantile_balancing and (self.expert_bias_rate > 0 or self.assignment != "greedy"):
            raise ValueError("quantile_balancing solves the selection bias that expert_bias_rate steps and "
                             f"assignment={self.assignment!r} replaces; pick one")
        if self.topk_group is not None and self.topk_group > self.n_group:
            raise ValueError(f"topk_group={self.topk_group} must be <= n_group={self.n_group}")
        if self.null_experts and (self.biased_selection or self.assignment != "greedy" or self.n_group > 1):
            raise ValueError("null_experts take part in plain greedy top-k only (no expert bias, quantile balancing, "
                             "balanced assignment or groups)")
        if self.assignment != "greedy" and self.n_group > 1:
            raise ValueError(f"group-limited routing (n_group={self.n_group}) selects greedily; "
                             f"assignment={self.assignment!r} does not limit groups")
        return self

    @property
    def fixed_k(self) -> bool:  # a null route leaves a token fewer real experts
        return self.null_experts == 0

    @property
    def biased_selection(self) -> bool:
        """Whether a per-expert bias moves the selection (expert bias or Quantile Balancing)."""
        return self.expert_bias_rate > 0 or self.quantile_balancing

    def max_experts_per_token(self, num_experts: int) -> int:
        return self.k

    def layer_problems(self, num_experts: int) -> list[tuple[str, str]]:
        problems = []
        if num_experts % self.n_group:
            problems.append(("n_group", f"{self.n_group} groups do not split {num_experts} experts evenly"))
        elif self.k > (self.topk_group or self.n_group) * (num_experts // self.n_group):
            problems.append(("k", f"k={self.k} exceeds the {(self.topk_group or self.n_group) * (num_experts // self.n_group)} "
                                  "experts of the topk_group groups a token keeps"))
        if self.null_experts and self.k > num_experts + self.null_experts:
            problems.append(("k", f"k={self.k} exceeds the {num_experts} experts and {self.null_experts} null experts"))
        if self.quantile_balancing and self.k >= num_experts:
            problems.append(("quantile_balancing", f"needs k < num_experts (each token's (k+1)-th choice); k={self.k}"))
        return problems


# --- attention
@ROUTER_OPTIONS.register("attention")
class AttentionOptions(TopKOptions):
    d_key: PositiveInt = 32


# --- entropy_adaptive
@ROUTER_OPTIONS.register("entropy_adaptive")
class EntropyAdaptiveOptions(ComputeTargetOptions):
    fixed_k: ClassVar[bool] = False
    min_k: PositiveInt = 1
    max_k: PositiveInt = 2
    # normalized: report 003's rule, entropy / log E mapped linearly onto [min_k, max_k]; perplexity: ceil(exp H)
    rule: Literal["normalized", "perplexity"] = "normalized"
    # Multiplies the entropy term (normalized entropy, or exp H): above 1 more experts per token, below 1 fewer.
    entropy_scale: Annotated[PositiveFloat, ADDED_LATER] = 1.0
    calibration_knob: ClassVar[Knob] = Knob("entropy_scale", 0.01, 100.0, log_scale=True)

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
class TopAnyOptions(ComputeTargetOptions):
    fixed_k: ClassVar[bool] = False
    tau: PositiveFloat = 10.0  # temperature of the cosine similarity
    init_threshold: float = 0.0  # G_e at initialization (threshold sigmoid(tau*G_e))
    diversity_loss: NonNegativeFloat = 0.0  # ||W^T W - I||_F on normalized expert embeddings
    simplicity_loss: NonNegativeFloat = 0.0  # mean ||w_e||
    # Added to every expert's trained threshold G_e: above 0 fewer experts pass, below 0 more (cosines lie in [-1, 1]).
    threshold_offset: Annotated[float, ADDED_LATER] = 0.0
    calibration_knob: ClassVar[Knob] = Knob("threshold_offset", -10.0, 10.0, more_experts_when_higher=False)

    def max_experts_per_token(self, num_experts: int) -> int:
        return num_experts


# --- top_p
@ROUTER_OPTIONS.register("top_p")
class TopPOptions(ComputeTargetOptions):
    fixed_k: ClassVar[bool] = False
    p: confloat(gt=0, le=1) = 0.4
    max_k: PositiveInt | None = None
    entropy_loss: NonNegativeFloat = 0.0
    calibration_knob: ClassVar[Knob] = Knob("p", 0.001, 1.0)

    def max_experts_per_token(self, num_experts: int) -> int:
        return min(self.max_k or num_experts, num_experts)
