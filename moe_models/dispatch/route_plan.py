"""Moving rows between token order and expert-sorted route order, as gathers both ways.

A RoutePlan sorts the served routes of a decision by expert. When every slot is served (fixed k, dropless) rows go
token -> route (dispatch) and route -> token slots (combine) by index_select, and each backward is again a gather with
the inverse index, never autograd's atomic bf16 index_add: deterministic, and several times faster for the K-fold
fan-out of a top-k dispatch. When slots can be unserved (top-p's K = E slots carry ~1.5 routes per token) the
(T, K, D) slot tensors would be mostly zeros, so token sums are fp32 scatter-adds over the served rows instead.
Shapes: S = T*K route slots (token-major), R = served routes (sorted by expert).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class RoutePlan:
    tokens: int  # T
    slots_per_token: int  # K
    order_R: torch.Tensor  # slot index (t*K + k) of each served route, sorted by expert (stable: token order within)
    expert_R: torch.Tensor  # expert of each served route
    counts_E: torch.Tensor  # served routes per expert
    slot_row_S: torch.Tensor  # row of each slot among the sorted routes; R (one past the end) for unserved slots

    @property
    def num_routes(self) -> int:
        return len(self.order_R)

    @property
    def all_served(self) -> bool:
        return self.num_routes == self.tokens * self.slots_per_token

    @property
    def token_R(self) -> torch.Tensor:
        return self.order_R // self.slots_per_token


def plan_routes(expert_ids_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int, all_served: bool) -> RoutePlan:
    """all_served: every slot is served (fixed k, dropless), so R = T*K is known without reading the device;
    otherwise R is read back once (the only host synchronisation of a dispatch)."""
    T, K = expert_ids_TK.shape
    key_S = torch.where(kept_TK, expert_ids_TK, num_experts).reshape(-1)  # num_experts = unserved, sorted last
    order_S = torch.argsort(key_S, stable=True)
    # scatter_add, not bincount: bincount reads its input's max back to the host on CUDA.
    counts_E = torch.zeros(num_experts + 1, dtype=torch.long, device=key_S.device).scatter_add_(
        0, key_S, torch.ones_like(key_S))[:num_experts]
    num_routes = T * K if all_served else int(counts_E.sum())
    order_R = order_S[:num_routes]
    slot_row_S = torch.full_like(key_S, num_routes).scatter_(
        0, order_R, torch.arange(num_routes, device=key_S.device))
    return RoutePlan(T, K, order_R, key_S.index_select(0, order_R), counts_E, slot_row_S)


def _token_sums(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, D): each token's sum over its served route rows."""
    if plan.all_served:  # a permutation: gather each token's K rows back, no atomics
        return rows_RD.index_select(0, plan.slot_row_S).view(plan.tokens, plan.slots_per_token, -1).sum(1)
    return _scatter_sum(rows_RD, plan)


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        ctx.plan = plan
        return x_TD.index_select(0, plan.token_R)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        return _token_sums(grad_RD, ctx.plan), None


class _Collect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        ctx.plan = plan
        return y_RD.index_select(0, plan.slot_row_S).view(plan.tokens, plan.slots_per_token, -1)

    @staticmethod
    def backward(ctx, grad_TKD: torch.Tensor):
        return grad_TKD.reshape(-1, grad_TKD.shape[-1]).index_select(0, ctx.plan.order_R), None


def dispatch_rows(x_TD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, D) tokens -> (R, D) route rows sorted by expert."""
    return _Dispatch.apply(x_TD, plan)


def combine_rows(y_RD: torch.Tensor, gate_TK: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(R, D) expert outputs -> (T, D): sum_k gate[t, k] * y[route of slot (t, k)]; unserved slots add nothing."""
    if plan.all_served:
        slots_TKD = _Collect.apply(y_RD, plan)
        return (slots_TKD * gate_TK.to(y_RD.dtype).unsqueeze(-1)).sum(1)
    gate_R = gate_TK.reshape(-1).index_select(0, plan.order_R).to(y_RD.dtype)
    return _scatter_sum(y_RD * gate_R.unsqueeze(-1), plan)


def _scatter_sum(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """Per-token sums of served rows, accumulated in at least fp32 (native atomics; no bf16 rounding per add)."""
    acc = torch.promote_types(rows_RD.dtype, torch.float32)
    sums = torch.zeros(plan.tokens, rows_RD.shape[1], dtype=acc, device=rows_RD.device)
    return sums.index_add(0, plan.token_R, rows_RD.to(acc)).to(rows_RD.dtype)
