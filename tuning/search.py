"""Translate a SweepConfig into Ray Tune's param space, search algorithm and scheduler."""
from __future__ import annotations

from typing import Any

from ray import tune
from ray.tune.search import BasicVariantGenerator, ConcurrencyLimiter
from ray.tune.search.optuna import OptunaSearch

from tuning.asha import ResumableASHA
from tuning.sweep_config import Dimension, SweepConfig
from workflows.study.sections import TrainingConfig


def tune_metric(metric: str) -> str:
    """Reports reach Tune with '/' replaced by '_' (see workflows.cell.engine.report_metrics)."""
    return metric.replace("/", "_")


def domain(dim: Dimension, search: str):
    if dim.kind == "loguniform":
        return tune.loguniform(*dim.loguniform)
    if dim.kind == "uniform":
        return tune.uniform(*dim.uniform)
    if dim.kind == "randint":
        return tune.randint(*dim.randint)
    values = dim.choice if dim.choice is not None else dim.grid
    if dim.kind == "grid" or search == "grid":
        return tune.grid_search(values)
    return tune.choice(values)


def param_space(sweep: SweepConfig, num_bases: int) -> dict[str, Any]:
    bases = list(range(num_bases))
    # Every base cell gets its own samples; Optuna cannot take grid_search, so it samples the base too.
    base = tune.choice(bases) if sweep.search == "optuna" else tune.grid_search(bases)
    return {"base": base, "params": {path: domain(dim, sweep.search) for path, dim in sweep.space.items()}}


def num_samples(sweep: SweepConfig, num_bases: int) -> int:
    if sweep.search == "grid":
        return 1  # every combination once
    return sweep.num_samples * (num_bases if sweep.search == "optuna" else 1)


def search_algorithm(sweep: SweepConfig, max_concurrent: int):
    """The search algorithm, limited to `max_concurrent` running trials (TuneConfig.max_concurrent_trials would be
    ignored for a BasicVariantGenerator instance, so the limit is set here for both kinds)."""
    if sweep.search == "optuna":  # TPE by default
        return ConcurrencyLimiter(OptunaSearch(metric=tune_metric(sweep.metric), mode=sweep.mode, seed=0),
                                  max_concurrent=max_concurrent)
    # Random sampling x grid_search, seeded so the same study file samples the same trials.
    return BasicVariantGenerator(random_state=0, max_concurrent=max_concurrent)


def scheduler(sweep: SweepConfig, training: TrainingConfig, state_path: str):
    if sweep.scheduler == "none":
        return None
    # Rungs on optimizer steps (reported with every eval), so decisions line up with evaluations.
    return ResumableASHA(state_path, time_attr="step", max_t=training.steps, grace_period=training.eval_interval,
                         reduction_factor=2)
