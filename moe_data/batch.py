"""One micro-batch as a model consumes it, whatever the task."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass
class Batch:
    inputs: tuple[torch.Tensor, ...]  # the model's positional forward arguments
    num_targets: int  # tokens the loss averages over (padding excluded)
