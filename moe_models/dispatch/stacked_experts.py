"""E experts (D -> F -> D, the ExpertFFN of the DeepSpeed backend, GELU with biases or SwiGLU without) with weights
stacked along the expert axis, run on routes already sorted by expert.

Every path takes (x_RD, expert_R, counts_E): R route rows sorted by expert, counts_E of them per expert.
  * `grouped` (CUDA bf16): torch's grouped GEMM, no padding, no per-expert loop, no host synchronisation, bias and
    GELU (or SwiGLU) fused (fused.py);
  * `padded` (CUDA, other dtypes): a padded (E, C, D) buffer and batched matmuls (one host read: C);
  * `sliced` (CPU): per-expert 2-D GEMMs on contiguous slices (why: see its docstring).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.dispatch.fused import AddBias, BiasGelu, fused_swiglu
from moe_models.experts import Activation, activate, clamped_swiglu, has_biases, up_width


class StackedExperts(nn.Module):
    """nn.Linear layout per expert. GELU: up (E, F, D) + (E, F), down (E, D, F) + (E, D). SwiGLU: up (E, 2F, D)
    holding [gate; up], down (E, D, F), no biases: exactly transformers' MixtralExperts (gate_up_proj, down_proj).
    Clamped SwiGLU (GPT-OSS): the SwiGLU layout with biases (E, 2F) and (E, D)."""

    def __init__(self, num_experts: int, d_model: int, hidden: int, activation: Activation = "gelu"):
        super().__init__()
        self.activation = activation
        self.up_weight_EFD = nn.Parameter(torch.randn(num_experts, up_width(hidden, activation), d_model) * 0.02)
        self.down_weight_EDF = nn.Parameter(torch.randn(num_experts, d_model, hidden) * 0.02)
        biased = has_biases(activation)
        self.up_bias_EF = nn.Parameter(torch.zeros(num_experts, up_width(hidden, activation))) if biased else None
        self.down_bias_ED = nn.Parameter(torch.zeros(num_experts, d_model)) if biased else None

    @torch.no_grad()
    def load_gate_up_down(self, gate_up_EXD: torch.Tensor, down_EDF: torch.Tensor) -> None:
        """SwiGLU weights in transformers' stacked layout (MixtralExperts, Qwen2MoeExperts, OlmoeExperts)."""
        if self.activation != "swiglu":
            raise ValueError(f"gate/up/down weights are SwiGLU experts'; these experts are {self.activation}")
        self.up_weight_EFD.copy_(gate_up_EXD)
        self.down_weight_EDF.copy_(down_EDF)

    def _activate(self, h_RX: torch.Tensor) -> torch.Tensor:
        return activate(h_RX, self.activation)

    @property
    def num_experts(self) -> int:
        return self.up_weight_EFD.shape[0]

    def grouped(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor,
                align: int | None = None) -> torch.Tensor:
        """Rows past sum(counts_E) are a route plan's filler: the GEMMs skip them and their outputs are undefined.
        align: pad each expert's group to a multiple of this many rows. Under torch.compile the grouped GEMM's
        backward meets layouts whose kernel needs 16-byte group boundaries (eager's do not: there a row-count
        alignment would only cost copies), so compiled graphs pad to 8 rows (bf16)."""
        if align is None:
            align = 8 if torch.compiler.is_compiling() else 1
        if align > 1:
            return self._aligned(x_RD, expert_R, counts_E, align)
        offsets_E = counts_E.cumsum(0).to(torch.int32)  # group ends
        h = torch._grouped_mm(x_RD, self.up_weight_EFD.transpose(1, 2), offs=offsets_E)
        if self.activation == "swiglu":
            h = fused_swiglu(h)
        elif self.activation == "clamped_swiglu":  # no fused kernel: the bias gathered per route, then the unit
            h = clamped_swiglu(h + self.up_bias_EF[expert_R])
        elif self.activation == "gelu_tanh":  # no fused kernel for the tanh approximation: the eager gather
            h = F.gelu(h + self.up_bias_EF[expert_R], approximate="tanh")
        else:
            h = BiasGelu.apply(h, self.up_bias_EF, expert_R, offsets_E)
        y = torch._grouped_mm(h, self.down_weight_EDF.transpose(1, 2), offs=offsets_E)
        return y if self.down_bias_ED is None else AddBias.apply(y, self.down_bias_ED, expert_R, offsets_E)

    def _aligned(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor, align: int) -> torch.Tensor:
        """The grouped path on a buffer whose groups start at multiples of `align` rows: zero rows pad each group,
        R + E*(align-1) rows in all (static: no host read); rows past the last group are never read back. A route
        plan's filler rows (route_plan.py: after the served ones, expert = the last) land after the last expert's
        routes, inside its padding or past it: computed or not, their outputs are undefined by contract."""
        E, R = self.num_experts, len(expert_R)
        padded_E = (counts_E + align - 1) // align * align
        ends_E = padded_E.cumsum(0)
        row_R = (ends_E - padded_E)[expert_R] + torch.arange(R, device=x_RD.device) - (counts_E.cumsum(0) - counts_E)[
            expert_R]
        rows = R + E * (align - 1)
        x_pad = x_RD.new_zeros(rows, x_RD.shape[1]).index_copy(0, row_R, x_RD)
        expert_pad = torch.searchsorted(ends_E, torch.arange(rows, device=x_RD.device), right=True).clamp(max=E - 1)
        return self.grouped(x_pad, expert_pad, padded_E, align=1).index_select(0, row_R)

    # The host-read paths stay eager under torch.compile: traced, their graphs would specialize on the routing's
    # counts and recompile as routing changes.
    @torch.compiler.disable
    def padded(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        E, D = self.num_experts, x_RD.shape[-1]
        starts_E = counts_E.cumsum(0) - counts_E
        capacity = int(counts_E.max()) if len(expert_R) else 0  # the one host read of this path
        position_R = torch.arange(len(expert_R), device=x_RD.device) - starts_E[expert_R]
        flat_R = expert_R * capacity + position_R  # row of each route in the flattened (E*C, D) buffer
        buffer = x_RD.new_zeros(E * capacity, D).index_copy(0, flat_R, x_RD).view(E, capacity, D)
        h = torch.bmm(buffer, self.up_weight_EFD.transpose(1, 2))
        h = self._activate(h if self.up_bias_EF is None else h + self.up_bias_EF.unsqueeze(1))
        y = torch.bmm(h, self.down_weight_EDF.transpose(1, 2))
        y = y if self.down_bias_ED is None else y + self.down_bias_ED.unsqueeze(1)
        return y.view(E * capacity, D).index_select(0, flat_R)

    @torch.compiler.disable
    def sliced(self, x_RD: torch.Tensor, expert_R: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """CPU: one 2-D GEMM pair per expert on its contiguous slice of the sorted routes. On CPU there is no kernel
        launch to amortize and no host sync to avoid, 2-D GEMMs run ~30% faster than the padded batched ones (no
        padding, better blocking: 26 vs 36 ms for 8 x (1100x256 @ 256x1024) here), and torch's CPU grouped GEMM has no
        backward. Weights are unbound once, so the backward stacks their gradients in one allocation."""
        E = self.num_experts
        ups, downs = self.up_weight_EFD.unbind(0), self.down_weight_EDF.unbind(0)
        up_biases = self.up_bias_EF.unbind(0) if self.up_bias_EF is not None else [None] * E
        down_biases = self.down_bias_ED.unbind(0) if self.down_bias_ED is not None else [None] * E
        outputs = [F.linear(self._activate(F.linear(x_e, ups[e], up_biases[e])), downs[e], down_biases[e])
                   for e, x_e in enumerate(x_RD.split(counts_E.tolist())) if len(x_e)]
        return torch.cat(outputs) if outputs else x_RD.new_zeros(0, x_RD.shape[-1])
