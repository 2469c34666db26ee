"""Tiny MoE layers for tests, built the way the model families build theirs (moe_models.models.common.moe_block):
the study's router (its registry Options), a dispatch backend, balancing, optional shared experts. One builder,
instead of one per test file."""
from __future__ import annotations

import torch

from moe_models.experts import ExpertFFN
from moe_models.models.common import LayerShape, moe_block
from moe_models.moe_ffn import MoEFeedForward
from moe_models.routers import ROUTERS, RouterContext
from moe_models.spec import RoutingSpec


def tiny_moe(router: str = "topk", options: dict | None = None, *, d_model: int = 8, expert_hidden: int = 16,
             num_experts: int = 4, vocab_size: int = 100, backend: str = "deepspeed", activation: str = "gelu",
             capacity_factor: float | None = None, drop_policy: str = "position", balancing: dict | None = None,
             scope: str = "micro_batch", num_domains: int = 0, token_counts_V: torch.Tensor | None = None,
             shared_experts: bool = False, seed: int | None = 0) -> MoEFeedForward:
    """seed: torch's global seed right before the layer is built (None: leave it), so twins start equal."""
    if seed is not None:
        torch.manual_seed(seed)
    routing = RoutingSpec(router, ROUTERS.get(router).Options(**(options or {})), dict(balancing or {}),
                          capacity_factor, drop_policy, balancing_scope=scope)
    ctx = RouterContext(d_model, num_experts, vocab_size, 0, 0, num_domains=num_domains, token_counts_V=token_counts_V)
    shared = ExpertFFN(d_model, expert_hidden, activation) if shared_experts else None
    return moe_block(LayerShape(d_model, expert_hidden, num_experts, activation), 1, backend, routing, ctx, shared,
                     shared_expert_gate=shared_experts)
