"""Assignment registry: how a score-based router turns expert scores into chosen experts (selection only; gate
values stay the router's scores). Each method's file registers it; its name and file are listed here, so a study
file is validated without importing torch."""
from moe_models.registry import Registry

ASSIGNMENTS = Registry("assignment", lazy={"base": "moe_models.assignment.balanced",
                                           "greedy": "moe_models.assignment.greedy",
                                           "sinkhorn": "moe_models.assignment.sinkhorn"})

__all__ = ["ASSIGNMENTS"]
