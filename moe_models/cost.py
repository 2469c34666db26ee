"""Model FLOPs per token from the architecture, with the experts each token actually used (not a profiler estimate).

Counting follows PaLM (Chowdhery et al. 2022, appendix B): 2 FLOPs per multiply-add of every matmul, the backward
twice the forward (training = 3x forward), attention scores and values 2 * 2 * S * D per token per attention layer
(the full S x S, causal masking not discounted), embeddings' lookups free (a tied LM head is a Linear and counted).
"""
from __future__ import annotations

from torch import nn

from moe_models.moe_ffn import MoEFeedForward


def dense_forward_flops_per_token(model: nn.Module, seq_len: int) -> float:
    """Forward FLOPs per token of everything but the experts: linears (routers included) plus attention."""
    experts = {id(m) for layer in model.modules() if isinstance(layer, MoEFeedForward)
               for m in layer.dispatch.modules()}
    linears = sum(_matmul_flops(m) for m in model.modules() if id(m) not in experts)
    return float(linears + _attention_layers(model) * 2 * 2 * seq_len * _d_model(model))


def _matmul_flops(module: nn.Module) -> int:
    if isinstance(module, nn.Linear):
        return 2 * module.in_features * module.out_features
    if type(module).__name__ == "Conv1D":  # transformers' GPT-2 projections: a Linear with its weight transposed
        return 2 * module.weight.numel()
    return 0


def _attention_layers(model: nn.Module) -> int:
    """A wrapped checkpoint says how many it has (moe_models/models/hf.py); our families' carry n_heads."""
    if hasattr(model, "attention_layers"):
        return model.attention_layers
    return sum(1 for m in model.modules() if hasattr(m, "n_heads") and not isinstance(m, MoEFeedForward))


def expert_forward_flops_per_route(layer: MoEFeedForward) -> float:
    """One token through one routed expert (shared experts run for every token: they count with the linears)."""
    return layer.dispatch.spec.flops_per_route


def training_flops_per_token(model: nn.Module, seq_len: int, expert_forward_flops_per_token: float) -> float:
    """Forward + backward FLOPs per token; the expert part is measured (served routes x FLOPs per route)."""
    return 3.0 * (dense_forward_flops_per_token(model, seq_len) + expert_forward_flops_per_token)


def _d_model(model: nn.Module) -> int:
    if hasattr(model, "d_model"):
        return model.d_model
    opts = getattr(model, "opts", None)
    if opts is None:
        raise ValueError(f"{type(model).__name__} has no `opts` with d_model; cannot count attention FLOPs")
    return opts.d_model
