"""Grouped dispatch: sort the served routes by expert, run all experts as one grouped GEMM, weighted combine.

Consumes the same RoutingDecision and the same capacity rule (`assign_slots`) as the DeepSpeed backend, so every
router — variable experts per token included — runs on it and drops the same routes. Expert weights are stacked
(E, ...) tensors instead of E modules:
  * CUDA, bf16: `torch._grouped_mm` over the expert-sorted routes (no padding, no per-expert Python loop) —
    written for the GPU benchmarks of issue 6 and not yet run on a GPU;
  * CUDA, other dtypes: the routes are scattered into a padded (E, C, D) buffer (C = the largest expert load, one
    host read) and run through two batched matmuls — no per-expert loop either;
  * CPU: per-expert 2-D GEMMs on the contiguous slices of the sorted routes (`StackedExperts.sliced`: why there).
Expert parallelism is not implemented on this backend yet: ep_size > 1 is refused (use `dispatch: deepspeed`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch.capacity import assign_slots
from moe_models.routing import RoutingDecision


class StackedExperts(nn.Module):
    """E two-layer GELU FFNs (D -> F -> D) with weights stacked along the expert axis (nn.Linear layout per expert)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int):
        super().__init__()
        self.up_weight_EFD = nn.Parameter(torch.randn(num_experts, hidden, d_model) * 0.02)
        self.up_bias_EF = nn.Parameter(torch.zeros(num_experts, hidden))
        self.down_weight_EDF = nn.Parameter(torch.randn(num_experts, d_model, hidden) * 0.02)
        self.down_bias_ED = nn.Parameter(torch.zeros(num_experts, d_model))

    def grouped(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Routes sorted by expert -> expert outputs, one grouped GEMM per projection (CUDA)."""
        offsets = counts_E.cumsum(0).to(torch.int32)
        h = torch._grouped_mm(x_RD, self.up_weight_EFD.transpose(1, 2), offs=offsets) + self.up_bias_EF[expert_R]
        h = F.gelu(h)
        return torch._grouped_mm(h, self.down_weight_EDF.transpose(1, 2), offs=offsets) + self.down_bias_ED[expert_R]

    def padded(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Routes sorted by expert -> expert outputs through a padded (E, C, D) buffer and batched matmuls."""
        starts_E = counts_E.cumsum(0) - counts_E
        position_R = torch.arange(len(expert_R), device=x_RD.device) - starts_E[expert_R]
        capacity = int(counts_E.max()) if len(expert_R) else 0  # the one host read of this layer
        E, D = len(counts_E), x_RD.shape[-1]
        flat_R = expert_R * capacity + position_R  # row of each route in the flattened (E*C, D) buffer
        buffer = x_RD.new_zeros(E * capacity, D).index_copy(0, flat_R, x_RD).view(E, capacity, D)
        h = F.gelu(torch.baddbmm(self.up_bias_EF.unsqueeze(1), buffer, self.up_weight_EFD.transpose(1, 2)))
        y = torch.baddbmm(self.down_bias_ED.unsqueeze(1), h, self.down_weight_EDF.transpose(1, 2))
        return y.view(E * capacity, D).index_select(0, flat_R)

    def sliced(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """CPU: one 2-D GEMM pair per expert on its contiguous slice of the sorted routes. On CPU there is no kernel
        launch to amortize and no host sync to avoid, 2-D GEMMs run ~30% faster than the padded batched ones (no
        padding, better blocking: 26 vs 36 ms for 8 x (1100x256 @ 256x1024) here), and torch's CPU grouped GEMM has no
        backward. Weights are unbound once, so the backward stacks their gradients in one allocation."""
        ups, up_biases = self.up_weight_EFD.unbind(0), self.up_bias_EF.unbind(0)
        downs, down_biases = self.down_weight_EDF.unbind(0), self.down_bias_ED.unbind(0)
        outputs = [F.linear(F.gelu(F.linear(x_e, ups[e], up_biases[e])), downs[e], down_biases[e])
                   for e, x_e in enumerate(x_RD.split(counts_E.tolist())) if len(x_e)]
        return torch.cat(outputs) if outputs else x_RD.new_zeros(0, x_RD.shape[-1])


class GroupedDispatch(nn.Module):
    def __init__(self, spec: DispatchSpec):
        super().__init__()
        if spec.ep_size > 1:
            raise ValueError(f"dispatch 'grouped' does not do expert parallelism yet (ep_size={spec.ep_size}); "
                             "use dispatch: deepspeed for ep_size > 1")
        self.spec = spec
        self.experts = StackedExperts(spec.num_experts, spec.d_model, spec.expert_hidden)

    def forward(self, x_TD: torch.Tensor, decision: RoutingDecision) -> DispatchOutput:
        slots = assign_slots(decision, self.spec.capacity_factor, self.spec.drop_policy)
        token_R, slot_R = slots.kept_TK.nonzero(as_tuple=True)
        expert_R = decision.expert_ids_TK[token_R, slot_R]
        order_R = torch.argsort(expert_R, stable=True)
        token_R, slot_R, expert_R = token_R[order_R], slot_R[order_R], expert_R[order_R]
        counts_E = torch.bincount(expert_R, minlength=self.spec.num_experts)
        x_RD = x_TD.index_select(0, token_R)
        # torch's grouped GEMM wants bf16 and 16-byte aligned rows on CUDA; everything else takes the padded path.
        aligned = self.spec.d_model % 8 == 0 and self.spec.expert_hidden % 8 == 0
        if x_TD.is_cuda:
            run = self.experts.grouped if x_TD.dtype == torch.bfloat16 and aligned else self.experts.padded
        else:
            run = self.experts.sliced
        y_RD = run(x_RD, expert_R, counts_E)
        gate_R = decision.weights_TK[token_R, slot_R].to(y_RD.dtype)
        y_TD = torch.zeros_like(x_TD).index_add_(0, token_R, y_RD * gate_R.unsqueeze(-1))
        return DispatchOutput(y_TD, slots.kept_TK)


DISPATCH_BACKENDS.register("grouped")(GroupedDispatch)
