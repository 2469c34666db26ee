"""A cell's cost metrics: step time, model FLOPs per token (architecture + the experts tokens actually used), achieved
TFLOP/s and MFU against the device's peak measured on this worker, and the routers' share of MoE-layer latency.

The peak is measured, not looked up: the best of a few large matmuls in the model's dtype (what the device delivers
here, the method of ../shared/reference/anchors.md), so CPU cells get a meaningful MFU too.
"""
from __future__ import annotations

import time
from typing import Callable

import torch
from torch import nn

from moe_models.cost import training_flops_per_token
from moe_models.models.kv_cache import synchronize
from moe_models.moe_ffn import MoEFeedForward
from workflows.metric_names import (
    SUMMARY_MFU,
    SUMMARY_PEAK_TFLOPS,
    SUMMARY_STEP_SECONDS,
    SUMMARY_TFLOPS_PER_DEVICE,
    SUMMARY_TRAIN_GFLOPS_PER_TOKEN,
)


def measure_peak_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Best of 10 n^3 matmuls after 3 warm-ups (n = 8192 on GPU, 1024 on CPU): ~20 ms on an H100, ~0.3 s on 2 cores."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = torch.randn(n, n, device=device, dtype=dtype), torch.randn(n, n, device=device, dtype=dtype)
    best = float("inf")
    for i in range(13):
        synchronize(device)
        began = time.perf_counter()
        a @ b
        synchronize(device)
        if i >= 3:
            best = min(best, time.perf_counter() - began)
    return 2 * n**3 / best / 1e12


def router_latency_share(model: nn.Module, forward: Callable[[], object], repeats: int = 3) -> float | None:
    """Forward wall time inside the routers / inside the MoE layers (router included), over `repeats` eager forwards
    with the device synchronized at each layer boundary. None for a model without MoE layers."""
    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    if not layers:
        return None
    device = next(model.parameters()).device
    totals = {"router": 0.0, "layer": 0.0}
    started: dict[int, float] = {}

    def enter(module, *_):
        synchronize(device)
        started[id(module)] = time.perf_counter()

    def leave(kind: str):
        def hook(module, *_):
            synchronize(device)
            totals[kind] += time.perf_counter() - started.pop(id(module))
        return hook

    handles = [h for layer in layers for h in (
        layer.register_forward_pre_hook(enter), layer.register_forward_hook(leave("layer")),
        layer.router.register_forward_pre_hook(enter), layer.router.register_forward_hook(leave("router")))]
    # Eager even in a compiled model: hooks that synchronize and read host clocks are not code to trace, and the
    # share is a per-layer breakdown, which a fused graph would not have anyway.
    try:
        with torch.no_grad(), torch.compiler.set_stance("force_eager"):
            forward()  # warm-up (lazy initialisation, compiled kernels)
            totals.update(router=0.0, layer=0.0)
            for _ in range(repeats):
                forward()
    finally:
        for h in handles:
            h.remove()
    return totals["router"] / totals["layer"] if totals["layer"] > 0 else None


def cost_metrics(model: nn.Module, seq_len: int, tokens_per_s_per_device: float, expert_flops_per_token: float,
                 peak_tflops: float, step_seconds: float) -> dict[str, float]:
    """expert_flops_per_token: forward FLOPs per token in the experts, from the served routes of the last eval."""
    flops = training_flops_per_token(model, seq_len, expert_flops_per_token)
    achieved = flops * tokens_per_s_per_device / 1e12
    return {SUMMARY_STEP_SECONDS: step_seconds, SUMMARY_TRAIN_GFLOPS_PER_TOKEN: flops / 1e9,
            SUMMARY_TFLOPS_PER_DEVICE: achieved, SUMMARY_PEAK_TFLOPS: peak_tflops,
            SUMMARY_MFU: achieved / peak_tflops}
