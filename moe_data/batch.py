"""One micro-batch as a model consumes it, whatever the task."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # the model's positional forward arguments
    num_targets: int  # tokens the loss averages over (padding excluded)

    def to(self, device: torch.device | str) -> "Batch":
        """Batches are built on the host; the model may live on an accelerator (DeepSpeed moves the model only)."""
        return Batch(tuple(x.to(device, non_blocking=True) for x in self.inputs), self.num_targets)
