"""Every model family's options, as a study file writes them: torch-free, so validating a study imports no torch.

A model family is its Options here plus one file beside this one that builds it (registered in `models/__init__.py`).
The `hf` family's checks that read a checkpoint's config.json alone (can this router be built on it?) live here too.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import (
    Field,
    NonNegativeInt,
    PositiveFloat,
    PositiveInt,
    confloat,
    model_validator,
)

from moe_models.dispatch import DISPATCH_BACKENDS
from moe_models.options import ADDED_LATER, StrictOptions
from moe_models.pretrained.architecture import Architecture
from moe_models.spec import Activation


class MoEModelOptions(StrictOptions):

    d_model: PositiveInt = 128
    n_heads: PositiveInt = 4
    num_experts: PositiveInt = 4
    expert_hidden: PositiveInt = 256  # F of each expert; the dense baseline scales it by its active experts
    moe_every: NonNegativeInt = 1  # MoE FFN in blocks where (index+1) % moe_every == 0; 0 = no MoE at all
    # Dense FFNs in the first k blocks of each stack, MoE after them (DeepSeek-V3's first_k_dense_replace: 3).
    first_k_dense: Annotated[NonNegativeInt, ADDED_LATER] = 0
    # Megatron-Core's list pattern, one entry per block of each stack: 1 = MoE, 0 = dense. Replaces moe_every and
    # first_k_dense.
    moe_layer_pattern: Annotated[tuple[Literal[0, 1], ...] | None, ADDED_LATER] = None
    # Another router in some MoE blocks, by block index within each stack: {0: {name: hash}} hash-routes the first
    # block, as DeepSeek-V4 does its first layers; the cell's router serves the rest. Balancing, capacity and scope
    # stay the cell's.
    layer_routers: Annotated[dict[NonNegativeInt, dict[str, Any]] | None, ADDED_LATER] = None
    # Latent MoE (Nemotron 3; Megatron-Core's moe_latent_size): routed experts run at this width, between a
    # down-projection of the token and an up-projection back, both shared by the layer's experts. The router and the
    # shared experts see the full width. None = experts at d_model.
    moe_latent_size: Annotated[PositiveInt | None, ADDED_LATER] = None
    ep_size: PositiveInt = 1  # expert-parallel ranks (DeepSpeed ep_size); must divide num_experts
    dispatch: str = "grouped"  # dropless grouped GEMMs (dispatch/grouped.py); "deepspeed" = DeepSpeed's MOELayer
    dropout: confloat(ge=0, lt=1) = 0.0
    expert_activation: Activation = "gelu"  # every FFN of the model: experts, shared experts, dense blocks
    # Always-on experts of expert_hidden each beside the routed ones (DeepSeekMoE, Qwen-MoE), optionally gated per
    # token (Qwen2-MoE). The dense baseline of "equal active FLOPs" counts them: its FFN is (active + shared) wide.
    num_shared_experts: NonNegativeInt = 0
    shared_expert_gate: bool = False

    @model_validator(mode="after")
    def _check(self) -> "MoEModelOptions":
        if self.d_model % self.n_heads:
            raise ValueError(f"d_model={self.d_model} must be divisible by n_heads={self.n_heads}")
        if self.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide num_experts={self.num_experts}")
        if self.dispatch not in DISPATCH_BACKENDS:
            raise ValueError(f"dispatch={self.dispatch!r} unknown; valid: {', '.join(DISPATCH_BACKENDS.names())}")
        if self.shared_expert_gate and not self.num_shared_experts:
            raise ValueError("shared_expert_gate: gates the shared experts, and num_shared_experts is 0")
        if self.moe_latent_size is not None and self.moe_latent_size >= self.d_model:
            raise ValueError(f"moe_latent_size={self.moe_latent_size} must be below d_model={self.d_model} (a latent "
                             "width at d_model or above only adds the projections)")
        for index, entry in (self.layer_routers or {}).items():
            if index >= max(self.stack_depths()) or not self.is_moe_block(index):
                raise ValueError(f"layer_routers: block {index} is not an MoE block of this model (blocks "
                                 f"{[i for i in range(max(self.stack_depths())) if self.is_moe_block(i)]} are)")
            self.layer_router(index)  # a known router with valid options
        if self.moe_layer_pattern is not None:
            if self.first_k_dense or self.moe_every != 1:
                raise ValueError("moe_layer_pattern: names every block's FFN; leave moe_every and first_k_dense out")
            depths = set(self.stack_depths())
            if depths != {len(self.moe_layer_pattern)}:
                raise ValueError(f"moe_layer_pattern: {len(self.moe_layer_pattern)} entries for stacks of "
                                 f"{' and '.join(map(str, sorted(depths)))} blocks; give one per block")
        elif self.first_k_dense and not all(any(map(self.is_moe_block, range(d))) for d in self.stack_depths()):
            raise ValueError(f"first_k_dense={self.first_k_dense} leaves no MoE block in a stack of "
                             f"{min(self.stack_depths())} (moe_every={self.moe_every})")
        return self

    def dense_width(self, active_experts: int) -> int:
        """FFN hidden width of a dense baseline with the active FLOPs of `active_experts` routed experts per token
        plus the shared ones."""
        return (active_experts + self.num_shared_experts) * self.expert_hidden

    def stack_depths(self) -> tuple[int, ...]:
        """Blocks per stack (one stack for a decoder; encoder and decoder for seq2seq): each family says."""
        raise NotImplementedError

    def moe_blocks(self) -> int:
        return sum(self.is_moe_block(i) for depth in self.stack_depths() for i in range(depth))

    def layer_router(self, index: int) -> tuple[str, Any] | None:
        """(router name, its options) for a block with a router of its own, else None."""
        from moe_models.routers.options import ROUTER_OPTIONS

        entry = dict((self.layer_routers or {}).get(index) or {})
        if not entry:
            return None
        name = entry.pop("name", None)
        if name not in ROUTER_OPTIONS:
            raise ValueError(f"layer_routers[{index}].name: {name!r} is not a router; valid: "
                             f"{', '.join(ROUTER_OPTIONS.names())}")
        return name, ROUTER_OPTIONS.get(name)(**entry)

    def is_moe_block(self, index: int) -> bool:
        """index counts the blocks of one stack (encoder and decoder separately)."""
        if self.moe_layer_pattern is not None:
            return bool(self.moe_layer_pattern[index])
        return index >= self.first_k_dense and self.moe_every > 0 and (index + 1) % self.moe_every == 0

class GPTOptions(MoEModelOptions):
    n_layers: PositiveInt = 2

    def stack_depths(self) -> tuple[int, ...]:
        return (self.n_layers,)

class LlamaOptions(MoEModelOptions):
    n_layers: PositiveInt = 2
    n_kv_heads: PositiveInt | None = None  # grouped-query attention (Ainslie et al. 2023); None = n_heads
    rope_theta: PositiveFloat = 10_000.0
    rms_norm_eps: PositiveFloat = 1e-6
    tie_embeddings: bool = False
    expert_activation: Activation = "swiglu"

    @model_validator(mode="after")
    def _heads(self) -> "LlamaOptions":
        if self.n_heads % self.kv_heads:
            raise ValueError(f"n_kv_heads={self.kv_heads} must divide n_heads={self.n_heads}")
        if (self.d_model // self.n_heads) % 2:
            raise ValueError(f"head dim d_model/n_heads={self.d_model // self.n_heads} must be even (rotary pairs)")
        return self

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def stack_depths(self) -> tuple[int, ...]:
        return (self.n_layers,)

class Seq2SeqOptions(MoEModelOptions):
    encoder_layers: PositiveInt = 2
    decoder_layers: PositiveInt = 2
    shared_embeddings: bool = True  # one token embedding for encoder, decoder and output projection
    positions: Literal["sinusoidal", "learned"] = "sinusoidal"
    label_smoothing: confloat(ge=0, lt=1) = 0.0

    def stack_depths(self) -> tuple[int, ...]:
        return (self.encoder_layers, self.decoder_layers)

class UpcycleOptions(StrictOptions):
    num_experts: PositiveInt = 8
    moe_every: PositiveInt = 1  # the MLP of every moe_every-th block, counting from 1, becomes MoE
    granularity: PositiveInt = 1
    scaling: Literal["preserve", "divide"] = "preserve"
    noise: confloat(ge=0) = 0.0
    drop_fraction: confloat(ge=0, le=1) = 0.0

    @model_validator(mode="after")
    def _groups(self) -> "UpcycleOptions":
        if self.num_experts % self.granularity:
            raise ValueError(f"granularity={self.granularity} must divide num_experts={self.num_experts} "
                             "(each virtual group holds every slice once)")
        return self

    def is_moe_layer(self, index: int) -> bool:
        return (index + 1) % self.moe_every == 0

class HFOptions(StrictOptions):
    pretrained: str = Field(min_length=1)  # hub name | local folder | cell:<model label>/<router label>
    upcycle: UpcycleOptions | None = None  # dense checkpoints only
    # MoE checkpoints: the swapped-in router starts from the checkpoint's gate (a linear router), or fresh.
    init_router: Literal["pretrained", "random"] = "random"
    dispatch: str = "grouped"
    ep_size: PositiveInt = 1

    @model_validator(mode="after")
    def _check(self) -> "HFOptions":
        from moe_models.pretrained.source import cell_source

        if self.dispatch not in DISPATCH_BACKENDS:
            raise ValueError(f"dispatch={self.dispatch!r} unknown; valid: {', '.join(DISPATCH_BACKENDS.names())}")
        cell_source(self.pretrained)  # a malformed cell: source is named here
        if self.upcycle and self.upcycle.num_experts % self.ep_size:
            raise ValueError(f"ep_size={self.ep_size} must divide upcycle.num_experts={self.upcycle.num_experts}")
        return self


def routing_problem(arch: Architecture, opts: HFOptions, dense_router: bool) -> str | None:
    """Why a (checkpoint, options, router) combination cannot be built, or None."""
    if arch.is_moe and opts.upcycle:
        return (f"upcycle: the checkpoint is already an MoE ({arch.model_type}, {arch.num_experts} experts); "
                "upcycling takes a dense checkpoint, router swap needs no upcycle")
    if arch.is_moe and dense_router:
        return (f"router dense on an MoE checkpoint ({arch.model_type}) has no dense FFN to train; for the "
                "checkpoint's own routing use {name: topk, k: <its k>} with init_router: pretrained")
    if not arch.is_moe and not dense_router and not opts.upcycle:
        return (f"a routed router on a dense checkpoint ({arch.model_type}) needs upcycle: {{num_experts: ...}} "
                "(router swap needs an MoE checkpoint)")
    if not arch.is_moe and opts.init_router == "pretrained":
        return "init_router: pretrained copies an MoE checkpoint's gate, and this checkpoint is dense"
    return None


def num_experts(arch: Architecture, opts: HFOptions) -> int:
    return opts.upcycle.num_experts if opts.upcycle else arch.num_experts


def moe_layers(arch: Architecture, opts: HFOptions) -> int:
    if opts.upcycle:
        return sum(opts.upcycle.is_moe_layer(i) for i in range(arch.num_layers))
    return len(arch.moe_layers)
