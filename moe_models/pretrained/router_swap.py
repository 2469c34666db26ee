"""Router swap: a pretrained MoE checkpoint's MoE block (Mixtral, Qwen2-MoE, Qwen3-MoE, OLMoE, DeepSeek-V3,
GLM-4-MoE: `layer.mlp` with a `gate` and stacked SwiGLU `experts`; GPT-OSS: a biased `router` and clamped-SwiGLU
experts with biases) becomes our MoEFeedForward, with the study's router and our dispatch, and the checkpoint's
experts (and Qwen2-MoE's gated shared expert) loaded into it. The router-architectures report swaps its
routers into a pretrained Qwen1.5-MoE this way; `init_router: pretrained` copies the checkpoint's gate into a
linear router, so a topk router with the checkpoint's k and renormalization computes the original model."""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_models.experts import CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT, ExpertFFN
from moe_models.models.common import LayerShape, init_fresh, moe_block
from moe_models.moe_ffn import MoEFeedForward
from moe_models.routers import RouterContext
from moe_models.spec import RoutingSpec

LOCAL_EXPERTS = "moe.deepspeed_moe.experts.deepspeed_experts"  # both backends' per-expert state-dict layout


def gate_of(mlp: nn.Module) -> nn.Module | None:
    """The block's router: `gate` in most families, `router` in GPT-OSS."""
    return getattr(mlp, "gate", None) or getattr(mlp, "router", None)


def is_moe_block(mlp: nn.Module) -> bool:
    experts = getattr(mlp, "experts", None)
    return gate_of(mlp) is not None and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj")


@dataclass(frozen=True)
class CheckpointExperts:
    """Global experts [first, first + n) of one MoE block, in our nn.Linear layout: up (n, 2F, D) as [gate; up],
    down (n, D, F), GPT-OSS's biases (n, 2F) and (n, D)."""
    up_EXD: torch.Tensor
    down_EDF: torch.Tensor
    up_bias_EF: torch.Tensor | None
    down_bias_ED: torch.Tensor | None
    activation: str
    first: int = 0


def expert_activation(experts: nn.Module, layer_index: int) -> str:
    if hasattr(experts, "gate_up_proj_bias"):
        if (experts.alpha, experts.limit) != (CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT):
            raise ValueError(f"layer {layer_index}: clamped SwiGLU with alpha {experts.alpha}, limit {experts.limit}; "
                             f"moelab's is GPT-OSS's ({CLAMPED_SWIGLU_ALPHA}, {CLAMPED_SWIGLU_LIMIT})")
        return "clamped_swiglu"
    act = type(getattr(experts, "act_fn", None)).__name__
    if act not in ("SiLU", "SiLUActivation"):
        raise ValueError(f"layer {layer_index}: experts use {act}; router swap knows SwiGLU (SiLU) experts and "
                         "GPT-OSS's clamped SwiGLU")
    return "swiglu"


def expert_weights(experts, layer_index: int, first: int = 0) -> CheckpointExperts:
    """A checkpoint's stacked experts (transformers' module, or the rows [first, ...) of its tensors) in our
    layout."""
    activation = expert_activation(experts, layer_index)
    if activation == "clamped_swiglu":  # GPT-OSS: (E, D, 2F), gate and up interleaved column by column
        w, b = experts.gate_up_proj.detach(), experts.gate_up_proj_bias.detach()
        up = torch.cat([w[..., 0::2], w[..., 1::2]], dim=-1).transpose(1, 2)
        up_bias = torch.cat([b[:, 0::2], b[:, 1::2]], dim=-1)
        return CheckpointExperts(up, experts.down_proj.detach().transpose(1, 2), up_bias,
                                 experts.down_proj_bias.detach(), activation, first)
    return CheckpointExperts(experts.gate_up_proj.detach(), experts.down_proj.detach(), None, None, activation, first)


def load_experts(layer: MoEFeedForward, up_EXD: torch.Tensor, down_EDF: torch.Tensor, ep_rank: int = 0,
                 up_bias_EF: torch.Tensor | None = None, down_bias_ED: torch.Tensor | None = None,
                 first: int = 0) -> None:
    """Global experts' weights (nn.Linear layout, stacked on dim 0, global experts [first, first + len)) into this
    rank's local experts (DeepSpeed places global experts [r*n, (r+1)*n) on expert-parallel rank r), through the
    state dict both backends speak."""
    n = layer.dispatch.spec.num_experts // layer.dispatch.spec.ep_size
    if not (first <= ep_rank * n and (ep_rank + 1) * n <= first + len(up_EXD)):
        raise ValueError(f"experts [{first}, {first + len(up_EXD)}) do not hold rank {ep_rank}'s "
                         f"[{ep_rank * n}, {(ep_rank + 1) * n})")
    state = {}
    for local in range(n):
        e = ep_rank * n + local - first
        state[f"{LOCAL_EXPERTS}.{local}.up.weight"] = up_EXD[e]
        state[f"{LOCAL_EXPERTS}.{local}.down.weight"] = down_EDF[e]
        if up_bias_EF is not None:
            state[f"{LOCAL_EXPERTS}.{local}.up.bias"] = up_bias_EF[e]
            state[f"{LOCAL_EXPERTS}.{local}.down.bias"] = down_bias_ED[e]
    missing, unexpected = layer.dispatch.load_state_dict(state, strict=False)
    left = [k for k in missing if "experts" in k]
    if unexpected or left:
        raise ValueError(f"expert weights do not fit the MoE layer: unexpected {unexpected}, missing {left}")


def swap_in(mlp: nn.Module, routing: RoutingSpec, ctx: RouterContext, dispatch: str, ep_size: int, ep_rank: int,
            init_router: str, experts: CheckpointExperts | None = None) -> MoEFeedForward:
    """Our MoE FFN computing what `mlp` computed, up to the router (the study's, fresh or from the gate).
    `experts`: the rank's experts, read from the checkpoint (expert_sharded_load.py); else `mlp.experts`' own."""
    experts = experts or expert_weights(mlp.experts, ctx.layer_index)
    E, D, hidden = ctx.num_experts, experts.up_EXD.shape[-1], experts.down_EDF.shape[-1]
    # Qwen2-MoE: one always-on expert, gated per token; DeepSeek-V3, GLM-4-MoE: always on, ungated.
    source = getattr(mlp, "shared_expert", None) or getattr(mlp, "shared_experts", None)
    shared = None if source is None else shared_expert(source, D)
    gated = getattr(mlp, "shared_expert_gate", None) is not None
    layer = moe_block(LayerShape(D, hidden, E, experts.activation), ep_size, dispatch, routing, ctx, shared, gated)
    if gated:
        with torch.no_grad():
            layer.shared_expert_gate.weight.copy_(mlp.shared_expert_gate.weight)
    load_experts(layer, experts.up_EXD, experts.down_EDF, ep_rank, experts.up_bias_EF, experts.down_bias_ED,
                 experts.first)
    init_fresh(layer.router, ctx.seed, f"layers.{ctx.layer_index}.router")
    if init_router == "pretrained":
        gate = gate_of(mlp)
        copy_gate(layer, gate.weight, ctx.layer_index)
        if getattr(gate, "bias", None) is not None:  # GPT-OSS's logit bias: it moves selection and the gates alike
            copy_logit_bias(layer, gate.bias, ctx.layer_index)
        bias = getattr(gate, "e_score_correction_bias", None)
        if bias is not None:  # DeepSeek-V3's aux-loss-free bias: it moves selection, from the first forward on
            copy_selection_bias(layer, bias, ctx.layer_index)
    return layer


def copy_selection_bias(layer: MoEFeedForward, bias_E: torch.Tensor, layer_index: int) -> None:
    router = layer.router
    if not hasattr(router, "expert_bias_E"):
        raise ValueError(f"layer {layer_index}: the checkpoint's router adds a selection bias, and router "
                         f"{type(router).__name__} has none; use a topk router (expert_bias_rate 0 keeps it fixed)")
    with torch.no_grad():
        router.expert_bias_E.copy_(bias_E.float())
    router.selection_bias = True


def copy_logit_bias(layer: MoEFeedForward, bias_E: torch.Tensor, layer_index: int) -> None:
    router_bias = getattr(layer.router, "logit_bias_E", None)
    if router_bias is None:
        raise ValueError(f"layer {layer_index}: the checkpoint's router adds a learned bias to its logits, and "
                         f"router {type(layer.router).__name__} has none; use a topk router with router_bias: true")
    with torch.no_grad():
        router_bias.copy_(bias_E.float())


def shared_expert(mlp: nn.Module, d_model: int) -> ExpertFFN:
    """A checkpoint's SwiGLU MLP (gate_proj, up_proj, down_proj) as our ExpertFFN, weights copied."""
    shared = ExpertFFN(d_model, mlp.down_proj.weight.shape[1], "swiglu")
    with torch.no_grad():
        shared.up.weight.copy_(torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight]))
        shared.down.weight.copy_(mlp.down_proj.weight)
    return shared


def copy_gate(layer: MoEFeedForward, gate_ED: torch.Tensor, layer_index: int) -> None:
    proj = getattr(layer.router, "proj", None)
    if not isinstance(proj, nn.Linear) or proj.weight.shape != gate_ED.shape:
        raise ValueError(f"layer {layer_index}: init_router: pretrained copies the checkpoint's linear gate "
                         f"{tuple(gate_ED.shape)}, and router {type(layer.router).__name__} has no linear scorer of "
                         "that shape; use init_router: random")
    with torch.no_grad():
        proj.weight.copy_(gate_ED)
