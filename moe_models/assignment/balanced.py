"""BASE layers' balanced assignment (Lewis et al. 2021, arXiv 2103.16716; fairseq base_layer.py).

Training: every expert takes exactly its share of the T tokens (ceil or floor of T/E), maximizing the total affinity
— a linear assignment problem, solved as fairseq's libbase does with an auction (Bertsekas 1988) over experts with
multiple identical slots. Evaluation: greedy top-1. BASE is top-1 by definition (k must be 1).
"""
from __future__ import annotations

import torch

from moe_models.assignment.base import ASSIGNMENTS


def expert_capacities(T: int, E: int) -> list[int]:
    return [T // E + (1 if e < T % E else 0) for e in range(E)]


def balanced_assignment(scores_TE: torch.Tensor, eps: float | None = None, max_rounds: int = 10_000) -> torch.Tensor:
    """expert id per token, each expert receiving its capacity; total score within T*eps of the optimum."""
    scores_TE = scores_TE.detach().double()
    T, E = scores_TE.shape
    if eps is None:  # small against the score spread: the result is eps-optimal per token
        eps = 1e-3 * float(scores_TE.max() - scores_TE.min()) / max(1, T) + 1e-12
    caps_E = torch.tensor(expert_capacities(T, E))
    owner_T = torch.full((T,), -1, dtype=torch.long)
    bid_T = torch.zeros(T, dtype=torch.float64)  # the bid under which each token holds its expert
    price_E = torch.zeros(E, dtype=torch.float64)
    for _ in range(max_rounds):
        free = torch.nonzero(owner_T < 0).squeeze(1)
        if free.numel() == 0:
            break
        values = scores_TE[free] - price_E
        top2 = values.topk(min(2, E), dim=1)
        best = top2.indices[:, 0]
        second = top2.values[:, 1] if E > 1 else top2.values[:, 0] - 1.0
        bids = price_E[best] + (top2.values[:, 0] - second) + eps
        # Every expert keeps its `cap` highest bids among current holders and new bidders, all experts at once:
        # sort the pool by (expert, bid descending) and keep the first `cap` of each expert's run.
        held = torch.nonzero(owner_T >= 0).squeeze(1)
        pool_T, pool_E = torch.cat([held, free]), torch.cat([owner_T[held], best])
        pool_bid = torch.cat([bid_T[held], bids])
        order = torch.argsort(pool_bid, descending=True, stable=True)
        order = order[torch.argsort(pool_E[order], stable=True)]
        pool_T, pool_E, pool_bid = pool_T[order], pool_E[order], pool_bid[order]
        counts_E = torch.bincount(pool_E, minlength=E)
        rank = torch.arange(len(pool_E)) - (counts_E.cumsum(0) - counts_E)[pool_E]
        keep = rank < caps_E[pool_E]
        owner_T[pool_T] = torch.where(keep, pool_E, -1)
        bid_T[pool_T] = pool_bid
        full = keep & (rank == caps_E[pool_E] - 1)  # the cheapest held slot of a full expert sets its price
        price_E[pool_E[full]] = pool_bid[full]
    else:  # cap on rounds reached: place the rest in free slots (never hit in tests; a safety net)
        for t in torch.nonzero(owner_T < 0).squeeze(1).tolist():
            load = torch.bincount(owner_T[owner_T >= 0], minlength=E)
            room = [e for e in range(E) if load[e] < caps_E[e]]
            owner_T[t] = max(room, key=lambda e: float(scores_TE[t, e]))
    return owner_T.to(scores_TE.device)


@ASSIGNMENTS.register("base")
def base_top1(logits_TE: torch.Tensor, k: int, training: bool) -> torch.Tensor:
    if k != 1:
        raise ValueError(f"BASE balanced assignment is top-1; got k={k}")
    if not training:
        return logits_TE.argmax(dim=-1, keepdim=True)
    return balanced_assignment(logits_TE.cpu()).to(logits_TE.device).unsqueeze(1)
