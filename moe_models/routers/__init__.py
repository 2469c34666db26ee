"""Router registry, torch-free: every router's name and options (routers/options.py) are known here; its module
(`routers/<name>.py`, which registers the class) is imported on the first `ROUTERS.get(name)`."""
from moe_models.registry import Registry
from moe_models.routers.options import ROUTER_OPTIONS, RouterOptions

ROUTERS = Registry("router", lazy={name: f"moe_models.routers.{name}" for name in ROUTER_OPTIONS.names()})


def __getattr__(name: str):
    """The torch side (Router, RouterContext) on demand, so that importing the registry stays light."""
    if name in ("Router", "RouterContext"):
        from moe_models.routers import base

        return getattr(base, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


__all__ = ["ROUTERS", "ROUTER_OPTIONS", "Router", "RouterContext", "RouterOptions"]
