"""The routing decision: the one object every router produces and every dispatch backend consumes.

Shape legend used across moe_models/:
  T tokens (batch*seq flattened), D model dim, E experts, K route slots per token (max experts per token),
  F expert hidden dim, C expert capacity (tokens per expert buffer).
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch


@dataclass
class RoutingDecision:
    """Which experts each token goes to, and with what weight.

    The number of experts per token may vary (top-p, top-any): slot k of token t is a real route iff
    `active_TK[t, k]`. Inactive slots carry expert id 0 and weight 0 so that tensors stay dense.
    """

    expert_ids_TK: torch.Tensor  # long, selected expert per slot
    weights_TK: torch.Tensor  # float32 combine weights, 0 on inactive slots
    active_TK: torch.Tensor  # bool, which slots are real routes
    probs_TE: torch.Tensor  # float32 router distribution over experts (rows sum to 1); used by balancing + analytics
    logits_TE: torch.Tensor | None = None  # pre-softmax router logits (z-loss); None for parameter-free routers
    router_losses: dict[str, torch.Tensor] = field(default_factory=dict)  # router-specific losses, already scaled
    # Every slot is a route (fixed k: top-k, hash, reference), known without reading active_TK — lets a dispatch
    # size its buffers without asking the device.
    all_active: bool = False
    _routes_per_expert_E: torch.Tensor | None = field(default=None, repr=False, compare=False)

    @property
    def num_experts(self) -> int:
        return self.probs_TE.shape[-1]

    @property
    def experts_per_token_T(self) -> torch.Tensor:
        return self.active_TK.sum(dim=-1)

    def expert_mask_TE(self) -> torch.Tensor:
        """Float 0/1 mask of the selected experts per token (no gradient)."""
        mask = torch.zeros_like(self.probs_TE)
        mask.scatter_add_(1, self.expert_ids_TK, self.active_TK.to(mask.dtype))
        return mask.clamp_(max=1.0)

    def rows(self, keep_T: torch.Tensor) -> "RoutingDecision":
        """The decision restricted to some tokens (padding left out of analytics); no losses, no gradient."""
        return RoutingDecision(self.expert_ids_TK[keep_T], self.weights_TK.detach()[keep_T], self.active_TK[keep_T],
                               self.probs_TE.detach()[keep_T], all_active=self.all_active)

    def routes_per_expert_E(self) -> torch.Tensor:
        """How many routes each expert received: the one count of expert load that balancing losses, expert bias,
        dispatch capacity and analytics share, computed once per decision. A scatter-add (bincount would read its
        max back to the host on CUDA). No gradient: it counts discrete choices."""
        if self._routes_per_expert_E is None:
            counts_E = torch.zeros(self.num_experts, dtype=self.probs_TE.dtype, device=self.probs_TE.device)
            self._routes_per_expert_E = counts_E.scatter_add_(0, self.expert_ids_TK.flatten(),
                                                              self.active_TK.flatten().to(counts_E.dtype))
        return self._routes_per_expert_E
