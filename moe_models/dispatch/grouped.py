"""Grouped dispatch: sort every route by expert, run all experts at once on the sorted rows, weighted combine.

Consumes the same RoutingDecision and the same capacity rule (`assign_slots`) as the DeepSpeed backend, so every
router — variable experts per token included — runs on it and drops the same routes. All T*K route slots travel
(unserved ones sorted last and masked), so no shape depends on the routing and nothing reads back to the host on the
CUDA grouped-GEMM path. The experts themselves: moe_models/dispatch/stacked_experts.py.
Expert parallelism is not implemented on this backend yet: ep_size > 1 is refused (use `dispatch: deepspeed`).
"""
from __future__ import annotations

import torch
from torch import nn

from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch.capacity import assign_slots
from moe_models.dispatch.stacked_experts import StackedExperts
from moe_models.routing import RoutingDecision


class GroupedDispatch(nn.Module):
    def __init__(self, spec: DispatchSpec):
        super().__init__()
        if spec.ep_size > 1:
            raise ValueError(f"dispatch 'grouped' does not do expert parallelism yet (ep_size={spec.ep_size}); "
                             "use dispatch: deepspeed for ep_size > 1")
        self.spec = spec
        self.experts = StackedExperts(spec.num_experts, spec.d_model, spec.expert_hidden)

    def expert_path(self, x_TD: torch.Tensor):
        if not x_TD.is_cuda:
            return self.experts.sliced
        # torch's grouped GEMM wants bf16 and 16-byte aligned rows; other CUDA dtypes take the padded path.
        aligned = self.spec.d_model % 8 == 0 and self.spec.expert_hidden % 8 == 0
        return self.experts.grouped if x_TD.dtype == torch.bfloat16 and aligned else self.experts.padded

    def forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> DispatchOutput:
        E = self.spec.num_experts
        if self.spec.capacity_factor is None:
            kept_TK = decision.active_TK  # dropless: every active route is served (no capacity, no host read)
        else:
            kept_TK = assign_slots(decision, self.spec.capacity_factor, self.spec.drop_policy).kept_TK
        T, K = kept_TK.shape
        key_R = torch.where(kept_TK, decision.expert_ids_TK, E).reshape(-1)  # token-major routes; E = unserved
        order_R = torch.argsort(key_R, stable=True)
        expert_R = key_R.index_select(0, order_R)
        # scatter_add, not bincount: bincount reads its input's max back to the host on CUDA.
        counts_E = torch.zeros(E + 1, dtype=torch.long, device=key_R.device).scatter_add_(
            0, key_R, torch.ones_like(key_R))[:E]
        served_R1 = (expert_R < E).unsqueeze(-1)
        # Unserved rows are zeroed going in and coming out: selects, so whatever the experts leave in those rows
        # (unspecified, even NaN) reaches neither the output nor any gradient.
        x_RD = torch.where(served_R1, x_TD.index_select(0, order_R // K), 0)
        y_RD = torch.where(served_R1, self.expert_path(x_TD)(x_RD, expert_R, counts_E), 0)
        # Combine by gathering each token's K rows back (the inverse permutation): no atomics, deterministic.
        rank_R = torch.empty_like(order_R).scatter_(0, order_R, torch.arange(len(order_R), device=order_R.device))
        y_TKD = y_RD.index_select(0, rank_R).view(T, K, -1)
        gate_T1K = (decision.weights_TK * kept_TK).to(y_TKD.dtype).unsqueeze(1)
        return DispatchOutput(torch.bmm(gate_T1K, y_TKD).squeeze(1), kept_TK)


DISPATCH_BACKENDS.register("grouped")(GroupedDispatch)
