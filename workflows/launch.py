"""One cell = one Ray Train run: a TorchTrainer over `train_cell`, named by the cell id so a re-run resumes it."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from workflows.study import ResourcesConfig
from workflows.train_cell import train_cell


@dataclass
class CellResult:
    status: str  # FINISHED | FAILED
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)


def make_trainer(name: str, payload: dict[str, Any], resources: ResourcesConfig, storage_path: str,
                 callbacks: list | None = None) -> TorchTrainer:
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        train_cell,
        train_loop_config=payload,
        scaling_config=ScalingConfig(num_workers=resources.workers_per_cell, use_gpu=use_gpu,
                                     resources_per_worker=per_worker),
        run_config=RunConfig(
            name=name,  # deterministic (cell id / trial id): a re-run finds its checkpoints again
            storage_path=storage_path,
            failure_config=FailureConfig(max_failures=resources.max_failures),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            callbacks=callbacks,
        ),
    )


def fit_cell(cell_id: str, payload: dict[str, Any], resources: ResourcesConfig, storage_path: str) -> CellResult:
    try:
        result = make_trainer(cell_id, payload, resources, storage_path).fit()
    except Exception as err:  # TrainingFailedError and friends: the cell failed, the study goes on
        return CellResult("FAILED", f"{type(err).__name__}: {err}")
    return CellResult("FINISHED", None, dict(result.metrics or {}))


# A zero-CPU task only waits on the trainer's controller, so it never takes a core from the training workers.
fit_cell_remote = ray.remote(num_cpus=0, max_retries=0)(fit_cell)
