"""Router registry. One import line per router file registers it."""
from moe_models.routers.base import ROUTERS, Router, RouterContext, RouterOptions
from moe_models.routers import attention as _attention  # noqa: F401
from moe_models.routers import entropy_adaptive as _entropy_adaptive  # noqa: F401
from moe_models.routers import expert_choice as _expert_choice  # noqa: F401
from moe_models.routers import hash as _hash  # noqa: F401
from moe_models.routers import hybrid as _hybrid  # noqa: F401
from moe_models.routers import mlp as _mlp  # noqa: F401
from moe_models.routers import mlp_hadamard as _mlp_hadamard  # noqa: F401
from moe_models.routers import reference as _reference  # noqa: F401
from moe_models.routers import self_supervised as _self_supervised  # noqa: F401
from moe_models.routers import top_any as _top_any  # noqa: F401
from moe_models.routers import top_p as _top_p  # noqa: F401
from moe_models.routers import topk as _topk  # noqa: F401

__all__ = ["ROUTERS", "Router", "RouterContext", "RouterOptions"]
