"""What every MoE model family shares: the common options, the output, the FFN slot (dense or MoE), and the init.

A model family is one file beside this one: its Options extend MoEModelOptions, its FFN slots come from `build_ffn`,
and it calls `init_parameters` last, so every expert-parallel layout starts from the same weights.
"""
from __future__ import annotations

import re
import zlib
from dataclasses import dataclass, field, replace

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from moe_models.dispatch import DISPATCH_BACKENDS, DispatchSpec
from moe_models.dispatch.expert_parallel import StackedMoE
from moe_models.experts import Activation, ExpertFFN
from moe_models.moe_ffn import MoEAux, MoEFeedForward
from moe_models.models.options import MoEModelOptions
from moe_models.routers import ROUTERS, RouterContext
from moe_models.spec import RoutingSpec


@dataclass
class LMOutput:
    lm_loss: torch.Tensor  # mean next-token cross-entropy
    aux_loss: torch.Tensor  # sum over MoE layers of scaled balancing losses
    moe: dict[int, MoEAux] = field(default_factory=dict)  # block index -> that MoE layer's aux
    token_nll_BS: torch.Tensor | None = None  # per-token cross-entropy, detached (input difficulty)
    # MoE blocks whose (evaluation) expert masks are over the loss's tokens, in order; None = all of them.
    target_blocks: tuple[int, ...] | None = None
    # Per-token predictive entropy of the next-token distribution, evaluation only (no autograd graph): the
    # dynamic-routing report's measure of input difficulty, beside the token loss.
    token_entropy_BS: torch.Tensor | None = None
    # Evaluation only: mean NLL per sequence (an LM window, a seq2seq pair's summary), the unit the report's
    # two-level bootstrap resamples and pairs across cells.
    sequence_nll_B: torch.Tensor | None = None

    @property
    def loss(self) -> torch.Tensor:
        return self.lm_loss + self.aux_loss


def next_token_output(logits_BSV: torch.Tensor, targets_BS: torch.Tensor, aux: dict[int, MoEAux]) -> LMOutput:
    """A decoder LM's output: mean next-token cross-entropy (fp32), per-token NLL, and its MoE layers' aux losses."""
    token_nll = F.cross_entropy(logits_BSV.flatten(0, 1).float(), targets_BS.flatten(), reduction="none")
    lm_loss = token_nll.mean()
    aux_loss = sum((a.loss for a in aux.values()), lm_loss.new_zeros(()))
    token_nll_BS = token_nll.detach().view_as(targets_BS)
    entropy = sequence_nll = None
    if not logits_BSV.requires_grad:  # evaluating: one more pass over the logits, never in a training step
        log_p = F.log_softmax(logits_BSV.float(), dim=-1)
        entropy = -(log_p.exp() * log_p).sum(-1)
        sequence_nll = token_nll_BS.mean(-1)
    return LMOutput(lm_loss, aux_loss, aux, token_nll_BS, token_entropy_BS=entropy, sequence_nll_B=sequence_nll)


def build_ffn(opts: MoEModelOptions, stack_index: int, layer_index: int, routing: RoutingSpec, vocab_size: int,
              seed: int, num_domains: int = 0, token_counts_V: torch.Tensor | None = None) -> nn.Module:
    """The FFN of one block: dense (baseline, or a non-MoE block), or an MoE FFN whose router is unique per
    `layer_index` (the block's index over the whole model)."""
    activation = opts.expert_activation
    if routing.is_dense:
        return ExpertFFN(opts.d_model, opts.dense_width(routing.dense_active_experts), activation)
    if not opts.is_moe_block(stack_index):
        return ExpertFFN(opts.d_model, opts.expert_hidden, activation)
    own = opts.layer_router(stack_index)
    if own is not None:  # this block's own router; the cell's balancing, capacity and scope
        routing = replace(routing, router=own[0], options=own[1])
    shared = ExpertFFN(opts.d_model, opts.num_shared_experts * opts.expert_hidden, activation) \
        if opts.num_shared_experts else None  # N shared experts of width F add up to one FFN of width N*F
    latent = opts.moe_latent_size
    return moe_block(LayerShape(latent or opts.d_model, opts.expert_hidden, opts.num_experts, activation),
                     opts.ep_size, opts.dispatch, routing,
                     RouterContext(opts.d_model, opts.num_experts, vocab_size, layer_index, seed, num_domains,
                                   token_counts_V),
                     shared, opts.shared_expert_gate, model_width=opts.d_model)


@dataclass(frozen=True)
class LayerShape:
    d_model: int
    expert_hidden: int
    num_experts: int
    activation: Activation


def moe_block(shape: LayerShape, ep_size: int, dispatch: str, routing: RoutingSpec, ctx: RouterContext,
              shared_experts: nn.Module | None = None, shared_expert_gate: bool = False,
              model_width: int | None = None) -> MoEFeedForward:
    """An MoE FFN: the study's router (unique per ctx.layer_index), a dispatch backend, optional shared experts.
    Our model families and the surgery on pretrained checkpoints (moe_models/pretrained/) both build it here.
    `model_width` above shape.d_model: a latent MoE, its experts at shape.d_model between two projections."""
    router_cls = ROUTERS.get(routing.router)
    router = router_cls(ctx, routing.options or router_cls.Options())
    spec = DispatchSpec(shape.d_model, shape.expert_hidden, shape.num_experts, ep_size, routing.capacity_factor,
                        routing.drop_policy, shape.activation)
    latent = (model_width, shape.d_model) if model_width and model_width != shape.d_model else None
    return MoEFeedForward(router, DISPATCH_BACKENDS.get(dispatch)(spec), routing.balancing,
                          routing.balancing_scope, shared_experts, shared_expert_gate, latent)


_LOCAL_EXPERT = re.compile(r"deepspeed_experts\.(\d+)\.")


def init_parameters(model: nn.Module, seed: int, ep_size: int, std: dict[str, float] | None = None) -> None:
    """GPT-2 init, N(0, 0.02) for Linear/Embedding weights and zero biases (PyTorch's N(0, 1) embedding init makes the
    tied LM head's first logits huge), drawn per parameter from a generator keyed by (seed, name) — and for experts by
    their *global* id — so every expert-parallel layout (ep_size, world size) starts from the same weights.
    `std` overrides the standard deviation of named modules (e.g. scaled embeddings)."""
    ep_rank = dist.get_rank() % ep_size if dist.is_available() and dist.is_initialized() else 0
    for module_name, module in model.named_modules():
        if isinstance(module, StackedMoE):
            _init_stacked_experts(module_name, module, seed, ep_rank)
            continue
        if not isinstance(module, (nn.Linear, nn.Embedding)):
            continue
        for kind, param in (("weight", module.weight), ("bias", getattr(module, "bias", None))):
            if param is None:
                continue
            name = f"{module_name}.{kind}"
            local = _LOCAL_EXPERT.search(name)
            if local:  # DeepSpeed places global experts [r*n, (r+1)*n) on expert-parallel rank r
                num_local = len(model.get_submodule(name[:local.end() - 1].rsplit(".", 1)[0]))
                name = _LOCAL_EXPERT.sub(f"global_expert.{ep_rank * num_local + int(local.group(1))}.", name)
            gen = _named_generator(seed, name)
            with torch.no_grad():
                if kind == "bias":
                    param.zero_()
                else:
                    param.copy_(torch.randn(param.shape, generator=gen) * (std or {}).get(module_name, 0.02))


def _init_stacked_experts(module_name: str, moe: StackedMoE, seed: int, ep_rank: int) -> None:
    """The grouped backend's stacked experts get exactly the weights the DeepSpeed backend's ExpertFFNs get: the same
    generator names, keyed by global expert id (so the two backends start from identical models)."""
    experts = moe.experts
    with torch.no_grad():
        for i in range(moe.num_local_experts):
            prefix = f"{module_name}.deepspeed_moe.experts.global_expert.{ep_rank * moe.num_local_experts + i}"
            for sub, weight, bias in (("up", experts.up_weight_EFD, experts.up_bias_EF),
                                      ("down", experts.down_weight_EDF, experts.down_bias_ED)):
                gen = _named_generator(seed, f"{prefix}.{sub}.weight")
                weight[i].copy_(torch.randn(weight[i].shape, generator=gen) * 0.02)
                if bias is not None:  # SwiGLU experts have none
                    bias[i].zero_()


def init_fresh(module: nn.Module, seed: int, prefix: str) -> None:
    """N(0, 0.02) weights and zero biases for a module added to a pretrained model (a new router), keyed by
    (seed, prefix + parameter name) as init_parameters keys ours, leaving the checkpoint's weights alone."""
    with torch.no_grad():
        for name, param in module.named_parameters():
            if name.endswith("bias"):
                param.zero_()
            elif param.dim() >= 2:
                param.copy_(torch.randn(param.shape, generator=_named_generator(seed, f"{prefix}.{name}")) * 0.02)


def _named_generator(seed: int, name: str) -> torch.Generator:
    return torch.Generator().manual_seed(seed * 1_000_003 + zlib.crc32(name.encode()))
