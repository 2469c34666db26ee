"""Grouped dispatch: sort the served routes by expert, run all experts at once on the sorted rows, weighted combine.

Consumes the same RoutingDecision and the same capacity rule (`assign_slots`) as the DeepSpeed backend, so every
router — variable experts per token included — runs on it and drops the same routes. On the CUDA grouped-GEMM path
nothing reads back to the host: dropless fixed-k routing (top-k, hash) sizes everything from T*K, and variable-k or
capacity-limited routing with up to MAX_FILLER_SLOTS slots per token keeps all T*K slots, unserved ones as filler
rows the GEMMs skip; beyond that, and on the other paths, the served-route count is read once. Rows move by gathers
(route_plan.py), experts run in stacked_experts.py, and with ep_size > 1 routes travel to the ranks holding their
experts by all-to-all (expert_parallel.py; the container is a DeepSpeed MoE layer to the engine, and its checkpoints
load into the DeepSpeed backend and back).
"""
from __future__ import annotations

import torch
from torch import nn

from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch.capacity import assign_slots
from moe_models.dispatch.expert_parallel import StackedMoE, exchange_and_run
from moe_models.dispatch.route_plan import Sizing, combine_rows, dispatch_rows, plan_routes
from moe_models.dispatch.stacked_experts import StackedExperts
from moe_models.routing import RoutingDecision


# Filler rows replace the host read up to this many route slots per token (top-p or entropy-adaptive with max_k <= 4,
# as the dynamic-routing study runs them): activations of T*K rows, at most twice a top-2 layer's. Past it (top-p
# over all of E = 8 experts: T*8 rows for ~1.5 routes per token) reading R back costs less memory.
MAX_FILLER_SLOTS = 4


class GroupedDispatch(nn.Module):
    def __init__(self, spec: DispatchSpec):
        super().__init__()
        self.spec = spec
        self.moe = StackedMoE(spec)

    @property
    def experts(self) -> StackedExperts:
        """This rank's experts (all of them without expert parallelism)."""
        return self.moe.experts

    def grouped_gemm_applies(self, x_TD: torch.Tensor) -> bool:
        """torch's grouped GEMM wants CUDA, bf16 and 16-byte aligned rows; other inputs take the padded (CUDA) or
        sliced (CPU) path."""
        aligned = self.spec.d_model % 8 == 0 and self.spec.expert_hidden % 8 == 0
        return x_TD.is_cuda and x_TD.dtype == torch.bfloat16 and aligned

    def expert_path(self, x_TD: torch.Tensor):
        if self.grouped_gemm_applies(x_TD):
            return self.experts.grouped
        return self.experts.padded if x_TD.is_cuda else self.experts.sliced

    def sizing(self, x_TD: torch.Tensor, decision: RoutingDecision, dropless: bool) -> Sizing:
        """How many rows the route plan keeps (route_plan.py): exact for fixed-k dropless routing; filler rows in
        place of the host read where the grouped GEMM skips them and K is small; otherwise read the count (the other
        paths and expert parallelism's all-to-all read the device anyway)."""
        if decision.all_active and dropless:
            return "exact"
        slots = decision.expert_ids_TK.shape[1]
        if self.grouped_gemm_applies(x_TD) and self.spec.ep_size == 1 and slots <= MAX_FILLER_SLOTS:
            return "filler"
        return "read"

    def forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> DispatchOutput:
        dropless = self.spec.capacity_factor is None
        if dropless:
            kept_TK = decision.active_TK  # every active route is served: no capacity to compute
        else:
            kept_TK = assign_slots(decision, self.spec.capacity_factor, self.spec.drop_policy).kept_TK
        plan = plan_routes(decision.expert_ids_TK, kept_TK, self.spec.num_experts,
                           self.sizing(x_TD, decision, dropless))
        x_RD, run = dispatch_rows(x_TD, plan), self.expert_path(x_TD)
        if self.spec.ep_size == 1:
            y_RD = run(x_RD, plan.expert_R, plan.counts_E)
        else:
            y_RD = exchange_and_run(x_RD, plan.counts_E, self.moe, run)
        return DispatchOutput(combine_rows(y_RD, decision.weights_TK * kept_TK, plan), kept_TK)


DISPATCH_BACKENDS.register("grouped")(GroupedDispatch)
