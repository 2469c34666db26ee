"""The expert: a feed-forward D -> F -> D, the same shape as the dense baseline's FFN, in one of two activations.

  gelu:   down(gelu(up(x))), with biases (the original MoE papers);
  gelu_tanh: the same with GELU's tanh approximation (Hendrycks & Gimpel 2016; GPT-2's `gelu_new`), so an upcycled
          GPT-2 computes exactly its dense MLP;
  swiglu: down(silu(gate(x)) * up(x)), no biases (Shazeer 2020, "GLU Variants Improve Transformer"; Llama, Mixtral,
          Qwen-MoE, DeepSeek-MoE, OLMoE). `up` holds gate and up stacked, [gate; up] = (2F, D): the layout of one
          expert of transformers' MixtralExperts.gate_up_proj, so its weights copy in unchanged.
  clamped_swiglu: GPT-OSS's (OpenAI 2025): gate clamped above at 7, up clamped to [-7, 7],
          down((up + 1) * gate * sigmoid(1.702 gate)), with biases; `up` stacked [gate; up] as for swiglu.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.spec import Activation
ACTIVATIONS: tuple[str, ...] = ("gelu", "gelu_tanh", "swiglu", "clamped_swiglu")
GATED = ("swiglu", "clamped_swiglu")  # up holds [gate; up], 2F rows
CLAMPED_SWIGLU_ALPHA, CLAMPED_SWIGLU_LIMIT = 1.702, 7.0  # GPT-OSS's swiglu_alpha, swiglu_limit


def swiglu(h: torch.Tensor) -> torch.Tensor:
    """(..., 2F) stacked [gate, up] -> (..., F)."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate) * up


def clamped_swiglu(h: torch.Tensor) -> torch.Tensor:
    """(..., 2F) stacked [gate, up] -> (..., F), GPT-OSS's gated unit (transformers' GptOssExperts._apply_gate)."""
    gate, up = h.chunk(2, dim=-1)
    gate = gate.clamp(max=CLAMPED_SWIGLU_LIMIT)
    up = up.clamp(min=-CLAMPED_SWIGLU_LIMIT, max=CLAMPED_SWIGLU_LIMIT)
    return (up + 1) * gate * torch.sigmoid(gate * CLAMPED_SWIGLU_ALPHA)


def activate(h: torch.Tensor, activation: Activation) -> torch.Tensor:
    """The expert's nonlinearity on its up projection's output."""
    if activation == "swiglu":
        return swiglu(h)
    if activation == "clamped_swiglu":
        return clamped_swiglu(h)
    return F.gelu(h, approximate="tanh" if activation == "gelu_tanh" else "none")


def has_biases(activation: Activation) -> bool:
    """GELU experts carry biases (GPT-2's MLP), and GPT-OSS's clamped SwiGLU ones; SwiGLU experts have none
    (Llama's)."""
    return activation != "swiglu"


def up_width(hidden: int, activation: Activation) -> int:
    """Rows of the up projection: F, or 2F for SwiGLU's stacked gate and up."""
    return 2 * hidden if activation in GATED else hidden


def matmuls_per_token(activation: Activation) -> int:
    """D x F matmuls per token through one expert: up and down, plus SwiGLU's gate."""
    return 3 if activation in GATED else 2


class ExpertFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int, activation: Activation = "gelu"):
        super().__init__()
        self.activation = activation
        bias = has_biases(activation)
        self.up = nn.Linear(d_model, up_width(hidden, activation), bias=bias)
        self.down = nn.Linear(hidden, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.up(x)
        return self.down(activate(h, self.activation))
