"""Dispatch backends: move tokens to experts and back according to a RoutingDecision.

Every backend consumes the same decision and the same capacity rule (dispatch/capacity.py), so routers never know
which backend runs them. Adding a backend = one file registering a factory in `DISPATCH_BACKENDS`, and its name
in `dispatch/__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch
from torch import nn

from moe_models.dispatch import DISPATCH_BACKENDS
from moe_models.experts import Activation, matmuls_per_token
from moe_models.spec import DropPolicy


@dataclass(frozen=True)
class DispatchSpec:
    d_model: int
    expert_hidden: int
    num_experts: int
    ep_size: int
    capacity_factor: float | None  # None = dropless
    drop_policy: DropPolicy
    activation: Activation = "gelu"

    @property
    def flops_per_route(self) -> float:
        """One token through one expert: its D x F matmuls, 2 FLOPs per multiply-add."""
        return 2.0 * matmuls_per_token(self.activation) * self.d_model * self.expert_hidden


@dataclass
class DispatchOutput:
    y_TD: torch.Tensor
    kept_TK: torch.Tensor  # which routes were served (inactive or dropped routes are False)


class DispatchFactory(Protocol):
    """Builds an nn.Module whose forward(x_TD, decision) returns a DispatchOutput and whose `spec` attribute is the
    DispatchSpec it was built from (the MoE layer reads expert sizes from it for FLOP counts)."""

    def __call__(self, spec: DispatchSpec) -> nn.Module: ...


__all__ = ["DISPATCH_BACKENDS", "DispatchFactory", "DispatchOutput", "DispatchSpec"]
