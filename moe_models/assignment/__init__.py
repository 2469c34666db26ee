"""Assignment registry: how a score-based router turns expert scores into chosen experts (selection only; gate
values stay the router's scores). One import line per method file registers it."""
from moe_models.assignment.base import ASSIGNMENTS, Assign
from moe_models.assignment import balanced as _balanced  # noqa: F401
from moe_models.assignment import greedy as _greedy  # noqa: F401
from moe_models.assignment import sinkhorn as _sinkhorn  # noqa: F401

__all__ = ["ASSIGNMENTS", "Assign"]
