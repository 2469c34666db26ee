"""The grouped backend's elementwise tails, fused by torch.compile on CUDA (eager elsewhere).

Around the grouped GEMMs the backend adds each route's expert bias, applies GELU and sums each token's K weighted
slots. Eager, each is a pass (or three) over an (R, F) or (T, K, D) tensor plus a materialized gather of the bias;
fused, one pass forward and one backward: measured on an H100 at (16384, 1024, 4096, 8, 2), the bias+GELU fusion
alone took the layer from 5.89 to 5.47 ms. Shapes vary with routing, hence dynamic=True.
"""
from __future__ import annotations

import functools

import torch
import torch.nn.functional as F


def _bias_gelu(h_RF: torch.Tensor, bias_EF: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    return F.gelu(h_RF + bias_EF[expert_R])


def _add_bias(y_RD: torch.Tensor, bias_ED: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    return y_RD + bias_ED[expert_R]


def _weighted_sum(y_TKD: torch.Tensor, gate_TK: torch.Tensor) -> torch.Tensor:
    return (y_TKD * gate_TK.unsqueeze(-1).to(y_TKD.dtype)).sum(1)


@functools.cache
def _compiled(fn):
    return torch.compile(fn, dynamic=True)


def _on_device(fn, *args: torch.Tensor) -> torch.Tensor:
    return (_compiled(fn) if args[0].is_cuda else fn)(*args)


def bias_gelu(h_RF: torch.Tensor, bias_EF: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    """GELU(h + bias of each row's expert)."""
    return _on_device(_bias_gelu, h_RF, bias_EF, expert_R)


def add_bias(y_RD: torch.Tensor, bias_ED: torch.Tensor, expert_R: torch.Tensor) -> torch.Tensor:
    return _on_device(_add_bias, y_RD, bias_ED, expert_R)


def weighted_sum(y_TKD: torch.Tensor, gate_TK: torch.Tensor) -> torch.Tensor:
    """sum_k gate[t, k] * y[t, k]: the combine of a token's slots."""
    return _on_device(_weighted_sum, y_TKD, gate_TK)
