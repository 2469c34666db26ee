"""Sparse upcycling (Komatsuzaki et al. 2023): a dense checkpoint's MLP becomes our MoEFeedForward whose experts are
copies of it, and a fresh router is added. Options, as the reports and Megatron-Core give them:
  * granularity G (He et al. 2024, "Upcycling LLMs into MoE"; Megatron's --moe-upcycling-granularity): the MLP's
    hidden units are cut into G slices and expert e holds slice e % G; experts e // G form a virtual group whose
    router rows are tied, so a top-(k*G) router picks whole groups;
  * scaling `preserve` (Komatsuzaki; Megatron): at step 0 the MoE computes the dense MLP exactly, when the router's
    weights of a token sum to one (a renormalized top-k; k a multiple of G): each slice's output is scaled by G;
    scaling `divide` (the dynamic-routing report): each expert's output is the dense output / num_experts;
  * noise: Gaussian noise of `noise` x each weight's std added per expert, so copies can diverge;
  * drop_fraction (Drop-Upcycling, Nakamura et al. 2025): per expert, that fraction of its hidden units is re-drawn
    from a normal with the original weights' mean and std.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from moe_models.experts import Activation
from moe_models.models.common import LayerShape, init_fresh, moe_block
from moe_models.moe_ffn import MoEFeedForward
from moe_models.models.options import UpcycleOptions
from moe_models.pretrained.router_swap import load_experts
from moe_models.routers import RouterContext
from moe_models.spec import RoutingSpec

# transformers' activation names -> our expert activations (GPT-2's gelu_new is the tanh approximation).
GELU_NAMES = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh", "gelu_fast": "gelu_tanh"}


@dataclass
class DenseMLP:
    """A dense MLP's weights in nn.Linear layout: up (X, D) with [gate; up] stacked for SwiGLU, down (D, F)."""
    up_XD: torch.Tensor
    down_DF: torch.Tensor
    up_bias_X: torch.Tensor | None
    down_bias_D: torch.Tensor | None
    activation: Activation


def dense_mlp(mlp: nn.Module, config) -> DenseMLP:
    """GPT-2's MLP (Conv1D c_fc, c_proj: weights stored (in, out)) or a gated one (Llama, Qwen2, Mistral)."""
    if hasattr(mlp, "c_fc"):
        name = getattr(config, "activation_function", "gelu_new")
        if name not in GELU_NAMES:
            raise ValueError(f"activation_function {name!r}: upcycling knows {', '.join(GELU_NAMES)}")
        return DenseMLP(mlp.c_fc.weight.T, mlp.c_proj.weight.T, mlp.c_fc.bias, mlp.c_proj.bias, GELU_NAMES[name])
    if hasattr(mlp, "gate_proj"):
        if getattr(config, "hidden_act", "silu") != "silu":
            raise ValueError(f"hidden_act {config.hidden_act!r}: upcycling knows gated MLPs with silu (SwiGLU)")
        if mlp.gate_proj.bias is not None:
            raise ValueError("a gated MLP with biases: upcycling knows bias-free SwiGLU MLPs")
        up = torch.cat([mlp.gate_proj.weight, mlp.up_proj.weight])
        return DenseMLP(up, mlp.down_proj.weight, None, None, "swiglu")
    raise ValueError(f"{type(mlp).__name__}: not an MLP upcycling knows (GPT-2's c_fc/c_proj or gate/up/down_proj)")


def upcycle(mlp: nn.Module, config, opts: UpcycleOptions, routing: RoutingSpec, ctx: RouterContext, dispatch: str,
            ep_size: int, ep_rank: int) -> MoEFeedForward:
    dense = dense_mlp(mlp, config)
    F_ = dense.down_DF.shape[1]
    G, E = opts.granularity, opts.num_experts
    if F_ % G:
        raise ValueError(f"granularity={G} must divide the MLP's hidden width {F_}")
    hidden = F_ // G
    experts = [_expert(dense, e % G, hidden, opts, torch.Generator().manual_seed(
        ctx.seed * 1_000_003 + ctx.layer_index * 1009 + e)) for e in range(E)]
    up, down = torch.stack([x[0] for x in experts]), torch.stack([x[1] for x in experts])
    biases = (torch.stack([x[2] for x in experts]), torch.stack([x[3] for x in experts])) \
        if dense.up_bias_X is not None else (None, None)
    layer = moe_block(LayerShape(dense.down_DF.shape[0], hidden, E, dense.activation), ep_size, dispatch, routing,
                      ctx)
    load_experts(layer, up, down, ep_rank, *biases)
    init_fresh(layer.router, ctx.seed, f"layers.{ctx.layer_index}.router")
    proj = getattr(layer.router, "proj", None)
    if G > 1 and isinstance(proj, nn.Linear):
        with torch.no_grad():  # tie each virtual group's rows: its G slices score alike and are picked together
            proj.weight.copy_(proj.weight[torch.arange(E) // G * G])
    return layer


def _expert(dense: DenseMLP, slice_index: int, hidden: int, opts: UpcycleOptions, gen: torch.Generator):
    """One expert's (up, down, up bias, down bias): its slice of the dense MLP, scaled, noised, partly re-drawn."""
    rows = torch.arange(slice_index * hidden, (slice_index + 1) * hidden)
    F_ = dense.down_DF.shape[1]
    up_rows = torch.cat([rows, rows + F_]) if dense.activation == "swiglu" else rows  # gate and up halves alike
    up = dense.up_XD.detach()[up_rows].clone()
    down = dense.down_DF.detach()[:, rows].clone()
    up_bias = None if dense.up_bias_X is None else dense.up_bias_X.detach()[rows].clone()
    down_bias = None if dense.down_bias_D is None else dense.down_bias_D.detach().clone()
    scale = opts.granularity if opts.scaling == "preserve" else 1.0 / opts.num_experts
    down = down * scale
    if down_bias is not None and opts.scaling == "divide":  # preserve: each slice carries the whole bias, x G / G
        down_bias = down_bias / opts.num_experts
    if opts.noise:
        up = up + opts.noise * up.std() * torch.randn(up.shape, generator=gen)
        down = down + opts.noise * down.std() * torch.randn(down.shape, generator=gen)
    if opts.drop_fraction:
        up, down, up_bias = _redraw(dense, up, down, up_bias, hidden, opts.drop_fraction, gen)
    return up, down, up_bias, down_bias


def _redraw(dense: DenseMLP, up, down, up_bias, hidden: int, fraction: float, gen: torch.Generator):
    """Drop-Upcycling: re-initialize a random `fraction` of the expert's hidden units (their up/gate rows, down
    columns and up bias) from N(mean, std) of the dense weights."""
    dropped = torch.randperm(hidden, generator=gen)[:round(fraction * hidden)]
    if not len(dropped):
        return up, down, up_bias
    up_rows = torch.cat([dropped, dropped + hidden]) if dense.activation == "swiglu" else dropped
    ref_up, ref_down = dense.up_XD.detach(), dense.down_DF.detach()
    up[up_rows] = ref_up.mean() + ref_up.std() * torch.randn(len(up_rows), up.shape[1], generator=gen)
    down[:, dropped] = ref_down.mean() + ref_down.std() * torch.randn(down.shape[0], len(dropped), generator=gen)
    if up_bias is not None:
        up_bias[dropped] = 0.0
    return up, down, up_bias
