"""Sinkhorn routing (S-BASE; Clark et al. 2022, arXiv 2202.01169; Megatron-LM `sinkhorn`).

Training: rescale exp(logits) by row and column factors until every token carries mass 1/T and every expert 1/E
(a balanced transport plan), then take each token's top-k of the plan. Evaluation: greedy top-k of the logits.
"""
from __future__ import annotations

import torch

from moe_models.assignment.base import ASSIGNMENTS


def sinkhorn_plan(logits_TE: torch.Tensor, tol: float = 1e-4, max_iters: int = 1000) -> torch.Tensor:
    """Plan pi = d1 * exp(logits) * d0 with rows summing to 1/T and columns to 1/E (Megatron's iteration)."""
    cost_TE = torch.exp(logits_TE.float() - logits_TE.max())  # a constant shift cancels in the plan
    T, E = cost_TE.shape
    d0_T, d1_E = torch.ones(T, device=cost_TE.device), torch.ones(E, device=cost_TE.device)
    for _ in range(max_iters):
        d0_T = 1.0 / (T * ((cost_TE * d1_E).sum(dim=1) + 1e-8))
        new_d1_E = 1.0 / (E * ((cost_TE * d0_T.unsqueeze(1)).sum(dim=0) + 1e-8))
        converged = (new_d1_E - d1_E).abs().mean() < tol * new_d1_E.abs().mean()
        d1_E = new_d1_E
        if converged:
            break
    return d0_T.unsqueeze(1) * cost_TE * d1_E


@ASSIGNMENTS.register("sinkhorn")
def sinkhorn_topk(logits_TE: torch.Tensor, k: int, training: bool) -> torch.Tensor:
    if not training:
        return logits_TE.topk(k, dim=-1).indices
    return sinkhorn_plan(logits_TE).topk(k, dim=-1).indices
