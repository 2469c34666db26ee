"""Dispatch-backend registry. One import line per backend file registers it."""
from moe_models.dispatch.base import DISPATCH_BACKENDS, DispatchOutput, DispatchSpec
from moe_models.dispatch import deepspeed_moe as _deepspeed_moe  # noqa: F401
from moe_models.dispatch import grouped as _grouped  # noqa: F401

__all__ = ["DISPATCH_BACKENDS", "DispatchOutput", "DispatchSpec"]
