"""The one hook for stateful routing: called after every optimizer step (not every micro-batch), so state that
spans an optimizer batch — aux-loss-free expert-bias counts, global-batch balancing windows — is right under
gradient accumulation. Modules opt in by defining `after_optimizer_step()`."""
from __future__ import annotations

from torch import nn


def after_optimizer_step(model: nn.Module) -> None:
    for module in model.modules():
        hook = getattr(module, "after_optimizer_step", None)
        if hook is not None:
            hook()
