"""DeepSpeed-MoE dispatch: DeepSpeed's MoE/MOELayer (expert-parallel all-to-all over `ep_size` ranks) fed by a gate
adapter that hands it our RoutingDecision as the sparse (expert index, buffer location, gate) routes it expects.

We keep `deepspeed.moe.layer.MoE` as the container so the DeepSpeed engine recognises the layer: it creates the
expert-parallel process groups, all-reduces expert gradients over the expert-data-parallel group only, and saves
expert weights as per-rank expert checkpoint shards.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn

from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch.capacity import assign_slots
from moe_models.experts import ExpertFFN
from moe_models.routing import RoutingDecision


class DecisionGate(nn.Module):
    """Stands in for DeepSpeed's TopKGate: returns the routes of the decision set just before the call."""

    def __init__(self, spec: DispatchSpec):
        super().__init__()
        self.spec = spec
        self.ep_group: dist.ProcessGroup | None = None
        self.pending: RoutingDecision | None = None
        self.kept_TK: torch.Tensor | None = None

    def _set_ep_group(self, ep_group: dist.ProcessGroup) -> None:  # called by DeepSpeed's engine
        self.ep_group = ep_group

    def forward(self, x_TD: torch.Tensor, *_unused):
        decision, self.pending = self.pending, None
        assert decision is not None, "DecisionGate called without a routing decision"
        slots = assign_slots(decision, self.spec.capacity_factor, self.spec.drop_policy)
        capacity = torch.tensor(slots.capacity, device=x_TD.device)
        if self.spec.capacity_factor is None and self.spec.ep_size > 1:
            # All-to-all needs one buffer length on every rank of the expert-parallel group.
            dist.all_reduce(capacity, op=dist.ReduceOp.MAX, group=self.ep_group)
        kept_KT = slots.kept_TK.t()
        indices_KT = torch.where(kept_KT, decision.expert_ids_TK.t(), -1).to(torch.int32)
        locations_KT = (slots.location_TK.t() * kept_KT).to(torch.int32)
        gates_KT = decision.weights_TK.t().float() * kept_KT
        exp_counts_E = decision.routes_per_expert_E().detach()
        self.kept_TK = slots.kept_TK
        no_aux_loss = x_TD.new_zeros((), dtype=torch.float32)  # our losses are computed outside DeepSpeed
        return no_aux_loss, capacity, decision.num_experts, indices_KT, locations_KT, gates_KT, exp_counts_E


class DeepSpeedMoEDispatch(nn.Module):
    def __init__(self, spec: DispatchSpec):
        super().__init__()
        self.spec = spec
        self.moe = MoE(
            hidden_size=spec.d_model,
            expert=ExpertFFN(spec.d_model, spec.expert_hidden, spec.activation),
            num_experts=spec.num_experts,
            ep_size=spec.ep_size,
        )
        self.gate = DecisionGate(spec)
        self.moe.deepspeed_moe.gate = self.gate

    def forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> DispatchOutput:
        self.gate.pending = decision
        y_TD, _, _ = self.moe(x_TD)
        assert self.gate.kept_TK is not None
        return DispatchOutput(y_TD.reshape_as(x_TD), self.gate.kept_TK)


DISPATCH_BACKENDS.register("deepspeed")(DeepSpeedMoEDispatch)
