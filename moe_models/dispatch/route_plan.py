"""Moving rows between token order and expert-sorted route order, as gathers both ways.

A RoutePlan sorts the served routes of a decision by expert. Rows go token -> route (dispatch) and route -> slot
(combine) by index_select, and each op's backward is again a gather with the inverse index, never autograd's atomic
index_add: deterministic, and several times faster for the K-fold fan-out of a top-k dispatch.
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


def _with_zero_row(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """Row R reads as zeros for unserved slots (not needed, and not copied, when every slot is served)."""
    if plan.num_routes == plan.tokens * plan.slots_per_token:
        return rows_RD
    return torch.cat([rows_RD, rows_RD.new_zeros(1, rows_RD.shape[1])])


class _Dispatch(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x_TD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        ctx.plan = plan
        return x_TD.index_select(0, plan.order_R // plan.slots_per_token)

    @staticmethod
    def backward(ctx, grad_RD: torch.Tensor):
        plan = ctx.plan  # a token's gradient: the sum over its K slots' rows
        slots = _with_zero_row(grad_RD, plan).index_select(0, plan.slot_row_S)
        return slots.view(plan.tokens, plan.slots_per_token, -1).sum(1), None


class _Collect(torch.autograd.Function):
    @staticmethod
    def forward(ctx, y_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
        ctx.plan = plan
        slots = _with_zero_row(y_RD, plan).index_select(0, plan.slot_row_S)
        return slots.view(plan.tokens, plan.slots_per_token, -1)

    @staticmethod
    def backward(ctx, grad_TKD: torch.Tensor):
        plan = ctx.plan
        return grad_TKD.reshape(-1, grad_TKD.shape[-1]).index_select(0, plan.order_R), None


def dispatch_rows(x_TD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, D) tokens -> (R, D) route rows sorted by expert."""
    return _Dispatch.apply(x_TD, plan)


def collect_slots(y_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(R, D) expert outputs -> (T, K, D) per token slot; unserved slots are zeros."""
    return _Collect.apply(y_RD, plan)
