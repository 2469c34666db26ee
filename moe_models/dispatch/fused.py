"""The grouped backend's per-route bias and GELU (or SwiGLU), fused on CUDA.

Eager, `gelu(h + bias[expert])` materializes an (R, F) gather of the bias, makes three passes over (R, F), and its
backward scatters R rows into E with atomics. Here the forward is one fused pass and the backward another (kernels
from torch.compile on CUDA; the same functions run eagerly on CPU), and the bias gradient — a sum over each expert's
rows — is a grouped GEMM of ones against the gradient, the way the weight gradients are computed.
Measured on an H100, (16384, 1024, 4096, 8, 2): letting torch.compile differentiate these functions itself (an
atomic index_put for the bias, a slow reduction) made the layer 0.5 ms slower than eager; this split makes it faster.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from moe_models.experts import swiglu


def _bias_gelu(h_RF: torch.Tensor, bias_EF: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    return F.gelu(h_RF + bias_EF[expert_R])


def _bias_gelu_grad(grad_RF: torch.Tensor, h_RF: torch.Tensor, bias_EF: torch.Tensor,
                    expert_R: torch.Tensor) -> torch.Tensor:
    return torch.ops.aten.gelu_backward(grad_RF, h_RF + bias_EF[expert_R])


def _add_bias(y_RD: torch.Tensor, bias_ED: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    return y_RD + bias_ED[expert_R]


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)  # R varies with routing


def _run(fn, *args: torch.Tensor) -> torch.Tensor:
    return (_compiled(fn) if args[0].is_cuda else fn)(*args)


def bias_gradient(grad_RX: torch.Tensor, expert_R: torch.Tensor, offsets_E: torch.Tensor) -> torch.Tensor:
    """(E, X): the sum of each expert's rows (rows sorted by expert, offsets = group ends; rows past the last group
    are filler and add nothing)."""
    if grad_RX.is_cuda:
        ones_8R = grad_RX.new_ones(grad_RX.shape[0], 8).t()  # column-major (8, R): a weight gradient's layout
        return torch._grouped_mm(ones_8R, grad_RX.contiguous(), offs=offsets_E)[:, 0]
    in_groups_R = torch.arange(grad_RX.shape[0], device=grad_RX.device) < offsets_E[-1]
    return grad_RX.new_zeros(len(offsets_E), grad_RX.shape[1]).index_add_(
        0, expert_R, torch.where(in_groups_R.unsqueeze(-1), grad_RX, 0))


class BiasGelu(torch.autograd.Function):
    """gelu(h + bias[expert]) per route row."""

    @staticmethod
    def forward(ctx, h_RF, bias_EF, expert_R, offsets_E):
        ctx.save_for_backward(h_RF, bias_EF, expert_R, offsets_E)
        return _run(_bias_gelu, h_RF, bias_EF, expert_R)

    @staticmethod
    def backward(ctx, grad_RF):
        h_RF, bias_EF, expert_R, offsets_E = ctx.saved_tensors
        grad_pre = _run(_bias_gelu_grad, grad_RF.contiguous(), h_RF, bias_EF, expert_R)
        return grad_pre, bias_gradient(grad_pre, expert_R, offsets_E), None, None


class AddBias(torch.autograd.Function):
    """y + bias[expert] per route row."""

    @staticmethod
    def forward(ctx, y_RD, bias_ED, expert_R, offsets_E):
        ctx.save_for_backward(expert_R, offsets_E)
        return _run(_add_bias, y_RD, bias_ED, expert_R)

    @staticmethod
    def backward(ctx, grad_RD):
        expert_R, offsets_E = ctx.saved_tensors
        return grad_RD, bias_gradient(grad_RD, expert_R, offsets_E), None, None


def fused_swiglu(h_RX: torch.Tensor) -> torch.Tensor:
    """silu(gate) * up of stacked [gate, up] rows: one fused pass on CUDA (torch.compile differentiates it: no bias
    gather, so no atomics in its backward), eager elsewhere."""
    return _run(swiglu, h_RX)
