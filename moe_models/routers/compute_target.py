"""Matched compute while training: a dynamic router whose options set `target_experts_per_token` moves its knob
(top-p's p, top-any's threshold offset, entropy-adaptive's entropy scale; `calibration_knob`) after every optimizer
step toward the value at which it spends that many experts per token, so a cell trains, and is evaluated, at the
compute of the fixed-k router it is compared with.

The update is integral control on the step's measured experts per token m (all ranks' routes over all ranks' tokens):
    a <- clip(a + s * rate * (target - m))
in the knob's axis (log for a scale factor), s = +1 where a higher knob spends more experts, -1 otherwise; the same
per-step, counts-driven state update as aux-loss-free balancing's expert bias (Wang et al. 2024, arXiv 2408.15664).
Evaluation-time calibration of a finished cell (`moelab calibrate`) is moe_models/routers/calibration.py.
"""
from __future__ import annotations

import math

import torch

from moe_models.fp32_state import Fp32Buffers
from moe_models.routers.calibration import read_knob


class ComputeTarget(Fp32Buffers):
    """Mixin for a router with a `calibration_knob`; inert (no buffers, no hook) unless the target is set, so
    checkpoints of routers without one are unchanged."""

    fp32_buffers = ("knob_value", "routes_this_step", "tokens_this_step")

    def __init__(self, ctx, options):
        super().__init__(ctx, options)
        self.fp32_buffers = ComputeTarget.fp32_buffers if self.controlled else ()
        if not self.controlled:
            return
        knob = type(options).calibration_knob
        # Saved in checkpoints: a resumed cell goes on from the knob it reached (1-dim: DeepSpeed broadcasts no
        # scalars); the counts live for one optimizer step.
        self.register_buffer("knob_value", torch.tensor([float(getattr(options, knob.option))]))
        self.register_buffer("routes_this_step", torch.zeros(1), persistent=False)
        self.register_buffer("tokens_this_step", torch.zeros(1), persistent=False)
        self.register_forward_hook(ComputeTarget._count_routes)

    @property
    def controlled(self) -> bool:
        return getattr(self.options, "target_experts_per_token", None) is not None

    def _count_routes(self, inputs, decision) -> None:
        if self.training:
            self.routes_this_step += decision.active_TK.sum()
            self.tokens_this_step += decision.active_TK.shape[0]

    @torch.no_grad()
    def after_optimizer_step(self) -> None:
        if not self.controlled:
            return
        counts = torch.cat([self.routes_this_step, self.tokens_this_step])
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            torch.distributed.all_reduce(counts)  # the router is replicated on every rank: the global batch's count
        routes, tokens = counts.tolist()  # one small host read per step: the options hold the knob as a number
        self.routes_this_step.zero_()
        self.tokens_this_step.zero_()
        if tokens == 0:  # a step without a training forward
            return
        knob, opts = type(self.options).calibration_knob, self.options
        to_axis, from_axis = (math.log, math.exp) if knob.log_scale else (float, float)
        sign = 1.0 if knob.more_experts_when_higher else -1.0
        # The options hold the knob's current value on the host (the buffer mirrors it for checkpoints).
        moved = to_axis(getattr(opts, knob.option)) + sign * opts.target_rate * (opts.target_experts_per_token
                                                                                  - routes / tokens)
        self._use_knob(min(max(from_axis(moved), knob.low), knob.high))

    def _use_knob(self, value: float) -> None:
        value = torch.tensor(value, dtype=torch.float32).item()  # as the fp32 buffer holds it (a CPU tensor: no sync)
        self.knob_value.fill_(value)
        knob = type(self.options).calibration_knob
        self.options = self.options.model_copy(update={knob.option: value})

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs) -> None:
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if self.controlled and prefix + "knob_value" in state_dict:
            self._use_knob(self.knob_value.item())  # the options the forward reads follow the loaded knob


def reached_knob(model: torch.nn.Module) -> float | None:
    """The knob the model's routers trained at a target compute reached, the mean over layers (None: it has none)."""
    controlled = next((m for m in model.modules() if isinstance(m, ComputeTarget) and m.controlled), None)
    return None if controlled is None else read_knob(model, type(controlled.options).calibration_knob.option)
