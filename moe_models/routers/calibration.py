"""Matched compute by calibration: the value of a dynamic router's knob (top-p's p, top-any's threshold offset,
entropy-adaptive's entropy scale) at which it spends a target number of experts per token.

Experts per token is monotone in each knob, so bisection finds it; `measure` is whatever the caller counts experts
per token with (one router on hidden states, or a whole trained model's evaluation). Torch-free: each router's
options declare their knob (`calibration_knob`), so `moelab calibrate` refuses a router without one before loading
anything.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Iterator


@dataclass(frozen=True)
class Knob:
    """An option that moves a dynamic router's experts per token monotonically between `low` and `high`."""
    option: str
    low: float
    high: float
    more_experts_when_higher: bool = True
    log_scale: bool = False  # bisect in log space (a scale factor; `low` must be > 0)


@dataclass(frozen=True)
class Calibration:
    option: str
    value: float
    experts_per_token: float  # what `measure` gave at `value`
    target: float
    evaluations: int

    @property
    def gap(self) -> float:
        return self.experts_per_token - self.target


class CalibrationError(ValueError):
    pass


def calibrate(measure: Callable[[float], float], knob: Knob, target: float, tolerance: float = 0.01,
              max_evaluations: int = 40) -> Calibration:
    """The knob value whose experts per token is within `tolerance` of `target`, by bisection; after
    `max_evaluations` the closest value seen (the count is a mean of integers: it moves in steps). A target outside
    what the knob's range reaches is an error naming that range."""
    def to_axis(v: float) -> float:
        return math.log(v) if knob.log_scale else v

    def from_axis(a: float) -> float:
        return math.exp(a) if knob.log_scale else a

    seen: dict[float, float] = {}

    def at(value: float) -> float:
        seen[value] = measure(value)
        return seen[value]

    fewer, more = (knob.low, knob.high) if knob.more_experts_when_higher else (knob.high, knob.low)
    least, most = at(fewer), at(more)
    if not least - tolerance <= target <= most + tolerance:
        raise CalibrationError(f"{knob.option} in [{knob.low:g}, {knob.high:g}] spends {least:.3f} to {most:.3f} "
                               f"experts per token; the target {target:g} is outside")
    lo, hi = to_axis(fewer), to_axis(more)  # experts per token rises from lo to hi
    while len(seen) < max_evaluations and min(abs(v - target) for v in seen.values()) > tolerance:
        mid = (lo + hi) / 2
        if at(from_axis(mid)) < target:
            lo = mid
        else:
            hi = mid
    best = min(seen, key=lambda v: abs(seen[v] - target))
    return Calibration(knob.option, best, seen[best], target, len(seen))


def _routers_with_knob(model, option: str) -> Iterator:
    """The routers in `model` (any torch module) whose options declare `option` as their knob."""
    for module in model.modules():
        knob = getattr(type(getattr(module, "options", None)), "calibration_knob", None)
        if isinstance(knob, Knob) and knob.option == option:
            yield module


def set_knob(model, option: str, value: float) -> int:
    """Set `option` to `value` on every router in `model` that declares it as its knob (routers read their options at
    each forward). Returns how many routers it set."""
    routers = list(_routers_with_knob(model, option))
    for router in routers:
        router.options = router.options.model_copy(update={option: value})
    return len(routers)


def read_knob(model, option: str) -> float | None:
    """`option`, the mean over the routers in `model` that declare it as their knob (None: no such router). The
    routers of a model trained at a target compute each reached their own value (moe_models/routers/compute_target.py);
    otherwise they all hold the study's."""
    values = [getattr(router.options, option) for router in _routers_with_knob(model, option)]
    return sum(values) / len(values) if values else None
