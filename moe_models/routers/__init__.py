"""Router registry. One import line per router file registers it."""
from moe_models.routers.base import ROUTERS, Router, RouterContext, RouterOptions
from moe_models.routers import hash as _hash  # noqa: F401
from moe_models.routers import topk as _topk  # noqa: F401

__all__ = ["ROUTERS", "Router", "RouterContext", "RouterOptions"]
