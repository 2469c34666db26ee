"""Balancing-loss registry. One import line per method file registers it."""
from moe_models.balancing.base import BALANCING_LOSSES, BalancingLoss
from moe_models.balancing import sequence_lbl as _sequence_lbl  # noqa: F401
from moe_models.balancing import squared_usage as _squared_usage  # noqa: F401
from moe_models.balancing import switch_lbl as _switch_lbl  # noqa: F401
from moe_models.balancing import z_loss as _z_loss  # noqa: F401

__all__ = ["BALANCING_LOSSES", "BalancingLoss"]
