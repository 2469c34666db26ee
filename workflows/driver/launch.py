"""One cell = one Ray Train run: a TorchTrainer over `train_cell`, named by the cell id so a re-run resumes it."""
from __future__ import annotations

import functools
import json

import ray
from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
from ray.train.torch import TorchTrainer

from workflows import storage
from workflows.cell.job import CellJob, JobResult
from workflows.study.sections import ResourcesConfig


def run_cell_in_worker(job: CellJob) -> None:
    """The train loop Ray Train ships to each worker. It imports the training code there, in the worker: the driver
    never loads the engine, models or torch's compiler stack (faster to start, and a driver whose working dir Ray
    re-unpacks under it, as a second node on the same host does, has nothing left to import from it)."""
    from workflows.cell.train_cell import train_cell

    train_cell(job)


def make_trainer(name: str, job: CellJob, resources: ResourcesConfig, storage_path: str,
                 callbacks: list | None = None) -> TorchTrainer:
    use_gpu = resources.gpus_per_worker > 0
    per_worker = {"CPU": resources.cpus_per_worker, **({"GPU": resources.gpus_per_worker} if use_gpu else {})}
    return TorchTrainer(
        functools.partial(run_cell_in_worker, job),  # the job itself, typed: no config dict
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


# Ray Train V2's record of the checkpoints its controller registered, in the run's folder.
RAY_TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"


def registered_checkpoints(run_location: str) -> set[str] | None:
    """Names of the checkpoint folders Ray Train registered; None when its record cannot be read (then nothing is
    known to be an orphan)."""
    snapshot = storage.join(run_location, RAY_TRAIN_SNAPSHOT)
    if not storage.exists(snapshot):
        return set()
    try:
        state = json.loads(storage.read_text(snapshot))
        results = [*state["checkpoint_results"], *state.get("pending_training_results", []),
                   state.get("latest_checkpoint_result") or {}]
        return {r["checkpoint_dir_name"] for r in results if r}
    except (ValueError, KeyError, TypeError):
        return None


def prune_orphaned_checkpoints(run_location: str) -> list[str]:
    """Delete checkpoint folders Ray Train never registered. A kill between a worker persisting a checkpoint and the
    controller recording it leaves one, which Ray neither resumes from nor removes. Returns the names deleted."""
    registered = registered_checkpoints(run_location)
    if registered is None:
        return []
    orphans = [name for name in storage.subdirectories(run_location, "checkpoint_") if name not in registered]
    for name in orphans:
        storage.delete_dir(storage.join(run_location, name))
    return orphans


def fit_cell(job: CellJob, storage_path: str) -> JobResult:
    cell_id = job.cell.id
    prune_orphaned_checkpoints(storage.join(storage_path, cell_id))  # before Ray Train looks at the folder
    try:
        result = make_trainer(cell_id, job, job.cell.resources, storage_path).fit()
    except Exception as err:  # TrainingFailedError and friends: the cell failed, the study goes on
        return JobResult("FAILED", f"{type(err).__name__}: {err}")
    return JobResult("FINISHED", None, dict(result.metrics or {}))


# A zero-CPU task only waits on the trainer's controller, so it never takes a core from the training workers.
fit_cell_remote = ray.remote(num_cpus=0, max_retries=0)(fit_cell)
