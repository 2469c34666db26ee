"""Routing state that stays fp32 when the model is cast to bf16 or fp16.

`module.bfloat16()` / `.half()` / `.to(dtype)` cast every floating-point buffer along with the parameters: benchmarks
and notebooks cast whole models that way, and so do DeepSpeed engines configured with a `buffer_dtype` (0.19.8 casts
parameters only by default). The expert bias and the route counts are accumulators: bf16 holds integers exactly only up
to 256, and an expert-bias step of u rounds away once |b| > 256*u. Megatron-Core keeps its expert bias fp32 for the
same reason (`Router._maintain_float32_expert_bias`).
"""
from __future__ import annotations

from typing import Callable, ClassVar

import torch
from torch import nn


class Fp32Buffers(nn.Module):
    """Buffers named in `fp32_buffers` follow the module's device moves but never its dtype casts."""

    fp32_buffers: ClassVar[tuple[str, ...]] = ()

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> "Fp32Buffers":
        before = {name: self._buffers[name] for name in self.fp32_buffers}
        super()._apply(fn, recurse)
        for name, old in before.items():
            new = self._buffers[name]
            if new.dtype != old.dtype:  # undo the cast from the exact values (a meta tensor has none to keep)
                self._buffers[name] = new.to(old.dtype) if old.is_meta else old.to(new.device)
        return self
