"""Dispatch-backend registry, torch-free: each backend's name and the file that registers its factory, imported on
the first `DISPATCH_BACKENDS.get(name)` (validating a study file needs the names only)."""
from moe_models.registry import Registry

DISPATCH_BACKENDS = Registry("dispatch backend", lazy={"deepspeed": "moe_models.dispatch.deepspeed_moe",
                                                       "grouped": "moe_models.dispatch.grouped"})


def __getattr__(name: str):
    """The torch side (DispatchSpec, DispatchOutput) on demand."""
    if name in ("DispatchOutput", "DispatchSpec"):
        from moe_models.dispatch import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["DISPATCH_BACKENDS", "DispatchOutput", "DispatchSpec"]
