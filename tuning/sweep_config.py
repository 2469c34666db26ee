"""The `sweep:` section of a study file: which grid cells to sweep, over which router knobs, how.

Space keys are paths into a router entry as written in the study file: a router option (`k`, `p`, `threshold`),
`capacity_factor` (null = no dropping), or `balancing.<loss>` for a balancing coefficient (alpha).
"""
from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, PositiveInt, model_validator

from moe_models.options import NAME_PATTERN, StrictOptions
from workflows.metric_names import EVAL_LOSS

DISTRIBUTIONS = ("loguniform", "uniform", "randint", "choice", "grid")


class Dimension(StrictOptions):
    """Exactly one of: loguniform [lo, hi], uniform [lo, hi], randint [lo, hi), choice [...], grid [...]."""

    loguniform: tuple[float, float] | None = None
    uniform: tuple[float, float] | None = None
    randint: tuple[int, int] | None = None
    choice: list[Any] | None = None
    grid: list[Any] | None = None

    @model_validator(mode="after")
    def _one(self) -> "Dimension":
        given = [d for d in DISTRIBUTIONS if getattr(self, d) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {', '.join(DISTRIBUTIONS)} (got {', '.join(given) or 'none'})")
        lo_hi = self.loguniform or self.uniform or self.randint
        if lo_hi is not None and not lo_hi[0] < lo_hi[1]:
            raise ValueError(f"{given[0]}: lower bound must be below upper bound, got {list(lo_hi)}")
        if self.loguniform is not None and self.loguniform[0] <= 0:
            raise ValueError("loguniform: bounds must be positive")
        if self.choice == [] or self.grid == []:
            raise ValueError(f"{given[0]}: needs at least one value")
        return self

    @property
    def kind(self) -> str:
        return next(d for d in DISTRIBUTIONS if getattr(self, d) is not None)

    def probe_values(self) -> list[Any]:
        """Values that must all be valid router settings: every choice, or both ends of a range."""
        if self.choice is not None or self.grid is not None:
            return list(self.choice if self.choice is not None else self.grid)
        lo, hi = self.loguniform or self.uniform or self.randint
        return [lo, hi - 1] if self.randint else [lo, hi]


class SweepConfig(StrictOptions):

    name: str = Field(pattern=NAME_PATTERN)
    routers: list[str] = Field(default_factory=list)  # router display names; empty = every non-dense router
    models: list[str] = Field(default_factory=list)  # model display names; empty = all
    datasets: list[str] = Field(default_factory=list)  # dataset names; empty = all
    space: dict[str, Dimension] = Field(min_length=1)
    metric: str = EVAL_LOSS
    mode: Literal["min", "max"] = "min"
    num_samples: PositiveInt = 4  # per selected base cell (router x model x dataset)
    search: Literal["random", "grid", "optuna"] = "random"
    scheduler: Literal["none", "asha"] = "none"
    max_concurrent_trials: PositiveInt | None = None  # default: resources.max_concurrent_cells

    @model_validator(mode="after")
    def _search_fits_space(self) -> "SweepConfig":
        if self.search == "grid":
            ranged = [k for k, d in self.space.items() if d.kind not in ("choice", "grid")]
            if ranged:
                raise ValueError(f"search 'grid' needs choice/grid dimensions; ranged: {', '.join(ranged)}")
        if self.search == "optuna" and any(d.kind == "grid" for d in self.space.values()):
            raise ValueError("search 'optuna' cannot take grid dimensions (Optuna samples); use choice")
        return self
