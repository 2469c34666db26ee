"""The one hook for stateful balancing: called after every optimizer step (not every micro-batch), so the
aux-loss-free bias update sees the counts of the whole optimizer batch under gradient accumulation."""
from __future__ import annotations

from torch import nn


def after_optimizer_step(model: nn.Module) -> None:
    for module in model.modules():
        update = getattr(module, "update_expert_bias", None)
        if update is not None:
            update()
