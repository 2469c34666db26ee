"""The assignment interface: (router logits, k, training) -> chosen expert ids (T, k).

Balancing by *assignment* (Sinkhorn/S-BASE, BASE) changes which experts are chosen, not the loss; so it is a
selection step of the router, independent of the balancing losses and of their scope.
"""
from __future__ import annotations

from typing import Callable

import torch

from moe_models.assignment import ASSIGNMENTS

Assign = Callable[[torch.Tensor, int, bool], torch.Tensor]  # (logits_TE no grad, k, training) -> expert_ids_TK

__all__ = ["ASSIGNMENTS", "Assign"]
