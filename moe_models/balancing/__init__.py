"""Balancing-loss registry. Each method is one file (its name) that registers its function; listing the name here
lets a study file be validated without importing torch."""
from moe_models.registry import Registry

BALANCING_LOSSES = Registry("balancing loss", lazy={
    name: f"moe_models.balancing.{name}" for name in ("sequence_lbl", "squared_usage", "switch_lbl", "z_loss")})

__all__ = ["BALANCING_LOSSES"]
