"""Plain specs the workflows hand to moe_models (moe_models never sees the study file or pydantic schemas of it)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from moe_models.routers import RouterOptions

# An expert's (and a dense FFN's) nonlinearity (experts.py).
Activation = Literal["gelu", "gelu_tanh", "swiglu", "clamped_swiglu"]
# Which routes a full expert drops (dispatch/capacity.py): the latest in the batch, or the least likely.
DropPolicy = Literal["position", "probs"]
DENSE = "dense"  # pseudo-router name: the dense baseline replaces every MoE FFN by one FFN


@dataclass(frozen=True)
class RoutingSpec:
    router: str  # a ROUTERS name, or DENSE
    options: RouterOptions | None = None
    balancing: dict[str, float] = field(default_factory=dict)  # BALANCING_LOSSES name -> coefficient
    capacity_factor: float | None = None  # None = dropless
    drop_policy: DropPolicy = "position"
    # Dense baseline only: FFN hidden = dense_active_experts * expert_hidden (k for equal active FLOPs,
    # num_experts for equal parameters).
    dense_active_experts: int = 1
    balancing_scope: str = "micro_batch"  # micro_batch | sequence | global_batch

    @property
    def is_dense(self) -> bool:
        return self.router == DENSE
