"""The expert: a two-layer GELU FFN (D -> F -> D), the same shape as the dense baseline's FFN."""
from __future__ import annotations

import torch
from torch import nn


class ExpertFFN(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.up = nn.Linear(d_model, hidden)
        self.down = nn.Linear(hidden, d_model)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(nn.functional.gelu(self.up(x)))
