"""Balancing losses: pure functions of a RoutingDecision and the scope it is balanced over, returning the
*unscaled* loss.

The study file gives each a coefficient (`balancing: {switch_lbl: 0.01, z_loss: 0.001}`); the MoE layer multiplies.
Adding a method = one file with a function registered in `BALANCING_LOSSES` + its name in `__init__.py`.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Literal

import torch

from moe_models.balancing import BALANCING_LOSSES
from moe_models.routing import RoutingDecision

Scope = Literal["micro_batch", "sequence", "global_batch"]


@dataclass(frozen=True)
class BalanceScope:
    """Over which tokens a balancing loss counts expert load (Qiu et al. 2025, arXiv 2501.11873): this micro-batch,
    each sequence of it, or the global batch (every data-parallel rank and micro-batch of the optimizer step)."""

    kind: Scope = "micro_batch"
    sequence_length: int | None = None  # the decision's tokens are sequences of this length, in order
    window_routes_E: torch.Tensor | None = None  # global_batch: routes per expert over the whole window (no grad)

    def sequences(self, tokens: int) -> int:
        """The length of one sequence (the whole micro-batch when unknown)."""
        return self.sequence_length or tokens


MICRO_BATCH = BalanceScope()
BalancingLoss = Callable[[RoutingDecision, BalanceScope], torch.Tensor]

__all__ = ["BALANCING_LOSSES", "BalanceScope", "BalancingLoss", "MICRO_BATCH"]
