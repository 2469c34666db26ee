"""Hash routing (Roller et al. 2021, arXiv 2106.04426): a fixed token-id -> expert(s) table, no parameters.

Two tables, both drawn once per layer and stored as a buffer (checkpoints carry it, every rank agrees on it):
- "random": a seeded random lookup, k distinct experts per token id;
- "balanced": built from token frequencies of the training split — the most frequent token ids go greedily to the
  currently emptiest expert(s), so the expected load is close to uniform even on a Zipf-distributed stream. Ids never
  seen in training keep their random entry (they carry no load to balance).
Each selected expert gets weight 1/k.
"""
from __future__ import annotations

import heapq

import torch

from moe_models.routers import ROUTERS
from moe_models.routers.base import Router, RouterContext
from moe_models.routers.options import HashOptions
from moe_models.routing import RoutingDecision


def random_table(vocab_size: int, num_experts: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """(V, k) distinct experts per token id."""
    return torch.rand(vocab_size, num_experts, generator=generator).argsort(dim=1)[:, :k]


def balanced_table(token_counts_V: torch.Tensor, num_experts: int, k: int, fallback_VK: torch.Tensor) -> torch.Tensor:
    """Greedy longest-processing-time assignment: most frequent ids first, each to the k least-loaded experts."""
    table_VK = fallback_VK.clone()
    heap = [(0.0, e) for e in range(num_experts)]  # (load, expert)
    counts = token_counts_V.double().tolist()
    for token in sorted((t for t, c in enumerate(counts) if c > 0), key=lambda t: -counts[t]):
        chosen = [heapq.heappop(heap) for _ in range(k)]  # k distinct least-loaded experts
        for slot, (load, expert) in enumerate(chosen):
            table_VK[token, slot] = expert
            heapq.heappush(heap, (load + counts[token], expert))
    return table_VK


@ROUTERS.register("hash")
class HashRouter(Router):
    Options = HashOptions
    options: HashOptions

    def __init__(self, ctx: RouterContext, options: HashOptions):
        super().__init__(ctx, options)
        if options.k > ctx.num_experts:
            raise ValueError(f"hash k={options.k} exceeds num_experts={ctx.num_experts}")
        # Seeded per layer so different layers hash differently, identically on every rank and every run.
        gen = torch.Generator().manual_seed(1_000_003 * ctx.seed + ctx.layer_index)
        table_VK = random_table(ctx.vocab_size, ctx.num_experts, options.k, gen)
        if options.table == "balanced":
            if ctx.token_counts_V is None:
                raise ValueError("hash table=balanced needs the training split's token counts (RouterContext."
                                 "token_counts_V); the training loop passes them, a bare model must too")
            table_VK = balanced_table(ctx.token_counts_V, ctx.num_experts, options.k, table_VK)
        self.register_buffer("table_VK", table_VK)

    def forward(self, x_TD: torch.Tensor, token_ids_T: torch.Tensor) -> RoutingDecision:
        expert_ids_TK = self.table_VK[token_ids_T]
        k = self.options.k
        weights_TK = torch.full(expert_ids_TK.shape, 1.0 / k, dtype=torch.float32, device=x_TD.device)
        probs_TE = torch.zeros(len(token_ids_T), self.ctx.num_experts, device=x_TD.device)
        probs_TE.scatter_(1, expert_ids_TK, 1.0 / k)
        active_TK = torch.ones_like(expert_ids_TK, dtype=torch.bool)
        return RoutingDecision(expert_ids_TK, weights_TK, active_TK, probs_TE, logits_TE=None, all_active=True)
