"""Moving rows between token order and expert-sorted route order, as gathers both ways.

A RoutePlan sorts the route slots of a decision by expert, served slots first. How many rows it keeps is its sizing:
  * "exact" (fixed k, dropless): every slot is served, R = T*K, known without asking the device;
  * "filler": all T*K slots, the unserved ones sorted last as filler rows that the experts skip (their grouped-GEMM
    offsets end at the served routes; torch.nn.functional.grouped_mm documents that rows past offs[-1] are ignored)
    and that carry undefined values, masked out in both directions. No host read, at the price of T*K rows where R
    are served;
  * "read": only the R served routes, R read back from the device once.
When rows cover all slots (exact, filler) rows go token -> route (dispatch) and route -> token slots (combine) by
index_select, and each backward is again a gather with the inverse index, never autograd's atomic bf16 index_add:
deterministic, and several times faster for the K-fold fan-out of a top-k dispatch. With "read" plans token sums are
fp32 scatter-adds over the served rows.
Shapes: S = T*K route slots (token-major), R = rows of the plan (sorted by expert).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Sizing = Literal["exact", "filler", "read"]


@dataclass(frozen=True)
class RoutePlan:
    tokens: int  # T
    slots_per_token: int  # K
    order_R: torch.Tensor  # slot index (t*K + k) of each row, sorted by expert (stable: token order within)
    expert_R: torch.Tensor  # expert of each row (filler rows: the last expert, so indexing by it stays in range)
    counts_E: torch.Tensor  # served routes per expert: the experts' groups are the first sum(counts_E) rows
    slot_row_S: torch.Tensor  # row of each slot; "read" plans: R (one past the end) for unserved slots
    served_TK: torch.Tensor | None = None  # filler plans: which slots are served (the others point at filler rows)

    @property
    def num_rows(self) -> int:
        return len(self.order_R)

    @property
    def covers_all_slots(self) -> bool:
        """Exact and filler plans: every slot has a row, so token sums are gathers."""
        return self.num_rows == self.tokens * self.slots_per_token

    @property
    def token_R(self) -> torch.Tensor:
        return self.order_R // self.slots_per_token


def plan_routes(expert_ids_TK: torch.Tensor, kept_TK: torch.Tensor, num_experts: int, sizing: Sizing) -> RoutePlan:
    """sizing "exact" promises that every slot is kept (fixed k, dropless); see the module docstring."""
    T, K = expert_ids_TK.shape
    key_S = (expert_ids_TK if sizing == "exact" else torch.where(kept_TK, expert_ids_TK, num_experts)).reshape(-1)
    sorted_key_S, order_S = torch.sort(key_S, stable=True)  # unserved slots (key = num_experts) sort last
    # scatter_add, not bincount: bincount reads its input's max back to the host on CUDA.
    counts_E = torch.zeros(num_experts + 1, dtype=torch.long, device=key_S.device).scatter_add_(
        0, key_S, torch.ones_like(key_S))[:num_experts]
    rows = int(counts_E.sum()) if sizing == "read" else T * K
    order_R = order_S[:rows]
    # Exact and filler plans give every slot a row; "read" plans point unserved slots one past the end.
    slot_row_S = torch.full_like(key_S, rows) if sizing == "read" else torch.empty_like(key_S)
    slot_row_S.scatter_(0, order_R, torch.arange(rows, device=key_S.device))
    expert_R = sorted_key_S[:rows].clamp(max=num_experts - 1) if sizing == "filler" else sorted_key_S[:rows]
    return RoutePlan(T, K, order_R, expert_R, counts_E, slot_row_S, kept_TK if sizing == "filler" else None)


def _gather_slots(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, K, D): each slot's row; zeros for a filler plan's unserved slots (their rows hold undefined values)."""
    slots_TKD = rows_RD.index_select(0, plan.slot_row_S).view(plan.tokens, plan.slots_per_token, -1)
    if plan.served_TK is None:
        return slots_TKD
    return torch.where(plan.served_TK.unsqueeze(-1), slots_TKD, 0)  # not a multiply: undefined may be NaN


def _token_sums(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, D): each token's sum over its served route rows."""
    if plan.covers_all_slots:  # a permutation: gather each token's K rows back, no atomics
        return _gather_slots(rows_RD, plan).sum(1)
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
        return _gather_slots(y_RD, plan)

    @staticmethod
    def backward(ctx, grad_TKD: torch.Tensor):
        plan = ctx.plan
        if plan.served_TK is not None:  # a filler plan's unserved slots were zeros: no gradient to their rows
            grad_TKD = torch.where(plan.served_TK.unsqueeze(-1), grad_TKD, 0)
        return grad_TKD.reshape(-1, grad_TKD.shape[-1]).index_select(0, plan.order_R), None


def dispatch_rows(x_TD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(T, D) tokens -> (R, D) route rows sorted by expert."""
    return _Dispatch.apply(x_TD, plan)


def combine_rows(y_RD: torch.Tensor, gate_TK: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """(R, D) expert outputs -> (T, D): sum_k gate[t, k] * y[route of slot (t, k)]; unserved slots add nothing."""
    if plan.covers_all_slots:
        slots_TKD = _Collect.apply(y_RD, plan)
        return (slots_TKD * gate_TK.to(y_RD.dtype).unsqueeze(-1)).sum(1)
    gate_R = gate_TK.reshape(-1).index_select(0, plan.order_R).to(y_RD.dtype)
    return _scatter_sum(y_RD * gate_R.unsqueeze(-1), plan)


def _scatter_sum(rows_RD: torch.Tensor, plan: RoutePlan) -> torch.Tensor:
    """Per-token sums of served rows, accumulated in at least fp32 (native atomics; no bf16 rounding per add)."""
    acc = torch.promote_types(rows_RD.dtype, torch.float32)
    sums = torch.zeros(plan.tokens, rows_RD.shape[1], dtype=acc, device=rows_RD.device)
    return sums.index_add(0, plan.token_R, rows_RD.to(acc)).to(rows_RD.dtype)
