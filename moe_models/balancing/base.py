"""Balancing losses: pure functions of a RoutingDecision, returning the *unscaled* loss.

The study file gives each a coefficient (`balancing: {switch_lbl: 0.01, z_loss: 0.001}`); the MoE layer multiplies.
Adding a method = one file with a function registered in `BALANCING_LOSSES` + its name in `__init__.py`.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe_models.balancing import BALANCING_LOSSES
from moe_models.routing import RoutingDecision

BalancingLoss = Callable[[RoutingDecision], torch.Tensor]

__all__ = ["BALANCING_LOSSES", "BalancingLoss"]
