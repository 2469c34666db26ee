"""Greedy top-k: each token takes its k highest-scoring experts (Shazeer et al. 2017)."""
from __future__ import annotations

import torch

from moe_models.assignment.base import ASSIGNMENTS


@ASSIGNMENTS.register("greedy")
def greedy_topk(logits_TE: torch.Tensor, k: int, training: bool) -> torch.Tensor:
    return logits_TE.topk(k, dim=-1).indices
