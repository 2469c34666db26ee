"""Grouped dispatch: sort the served routes by expert, run all experts at once on the sorted rows, weighted combine.

Consumes the same RoutingDecision and the same capacity rule (`assign_slots`) as the DeepSpeed backend, so every
router — variable experts per token included — runs on it and drops the same routes. Dropless fixed-k routing
(top-k, hash) sizes everything from T*K, so the CUDA grouped-GEMM path never reads back to the host; other routing
reads the served-route count once. Rows move by gathers (route_plan.py), experts run in stacked_experts.py, and
with ep_size > 1 routes travel to the ranks holding their experts by all-to-all (expert_parallel.py; the container is
a DeepSpeed MoE layer to the engine, and its checkpoints load into the DeepSpeed backend and back).
"""
from __future__ import annotations

import torch
from torch import nn

from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch.capacity import assign_slots
from moe_models.dispatch.expert_parallel import StackedMoE, exchange_and_run
from moe_models.dispatch.route_plan import combine_rows, dispatch_rows, plan_routes
from moe_models.dispatch.stacked_experts import StackedExperts
from moe_models.routing import RoutingDecision


class GroupedDispatch(nn.Module):
    def __init__(self, spec: DispatchSpec):
        super().__init__()
        self.spec = spec
        self.moe = StackedMoE(spec)

    @property
    def experts(self) -> StackedExperts:
        """This rank's experts (all of them without expert parallelism)."""
        return self.moe.experts

    def expert_path(self, x_TD: torch.Tensor):
        if not x_TD.is_cuda:
            return self.experts.sliced
        # torch's grouped GEMM wants bf16 and 16-byte aligned rows; other CUDA dtypes take the padded path.
        aligned = self.spec.d_model % 8 == 0 and self.spec.expert_hidden % 8 == 0
        return self.experts.grouped if x_TD.dtype == torch.bfloat16 and aligned else self.experts.padded

    def forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> DispatchOutput:
        dropless = self.spec.capacity_factor is None
        if dropless:
            kept_TK = decision.active_TK  # every active route is served: no capacity to compute
        else:
            kept_TK = assign_slots(decision, self.spec.capacity_factor, self.spec.drop_policy).kept_TK
        plan = plan_routes(decision.expert_ids_TK, kept_TK, self.spec.num_experts, decision.all_active and dropless)
        x_RD, run = dispatch_rows(x_TD, plan), self.expert_path(x_TD)
        if self.spec.ep_size == 1:
            y_RD = run(x_RD, plan.expert_R, plan.counts_E)
        else:
            y_RD = exchange_and_run(x_RD, plan.counts_E, self.moe, run)
        return DispatchOutput(combine_rows(y_RD, decision.weights_TK * kept_TK, plan), kept_TK)


DISPATCH_BACKENDS.register("grouped")(GroupedDispatch)
