"""The driver of `moelab run`: study -> prepared data -> MLflow runs -> Ray Train cells -> comparison table.

Resume is the same command again: finished cells (FINISHED in MLflow) are skipped, the others reopen their MLflow
run and their Ray Train run (same name and storage path) continues from its latest checkpoint.
"""
from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from workflows import storage
from workflows.aggregate import table_rows, to_csv, to_markdown
from workflows.cells import Cell, expand
from workflows.provenance import git_commit, package_versions
from workflows.pretrained import PretrainedCell, evaluate_pretrained, pretrained_cells
from workflows.study import DatasetEntry, Study, StudyError
from workflows.summary_report import write_summarization_report
from workflows.tracking import Tracker, flatten


@dataclass
class Workspace:
    """Where a study keeps its state; everything is absolute because Ray workers run elsewhere."""

    root: Path
    tracking_uri: str
    # Checkpoints + prepared data on storage every node sees (multi-node): an NFS path or an object-store URI.
    shared_storage: str | None = None

    @classmethod
    def resolve(cls, workdir: str | Path, tracking_uri: str | None, storage_path: str | None = None) -> "Workspace":
        root = Path(workdir).expanduser().resolve()
        shared = None
        if storage_path:
            shared = storage_path if storage.is_uri(storage_path) else str(Path(storage_path).expanduser().resolve())
        return cls(root, tracking_uri or f"sqlite:///{root / 'mlflow.db'}", shared)

    @property
    def is_local_tracking(self) -> bool:
        return self.tracking_uri.startswith(("sqlite:", "file:")) or "://" not in self.tracking_uri

    @property
    def artifact_location(self) -> str | None:
        # A local store's default artifact root is relative to the process cwd; pin it inside the workdir.
        return (self.root / "mlartifacts").as_uri() if self.is_local_tracking else None

    @property
    def storage_path(self) -> str:
        return storage.join(self.shared_storage or self.root, "ray_results")

    def cell_storage(self, study_name: str) -> str:
        """Ray Train storage of a study's cells (run name = cell id). Per study: two studies in one workdir can share
        a cell id, and one must not resume from the other's checkpoints (its MLflow run would stay empty)."""
        return storage.join(self.storage_path, study_name)

    @property
    def cache_dir(self) -> Path:
        """Where data is prepared: on the shared filesystem when there is one (workers read it there); locally when
        the shared storage is an object store (the files are then published to `published_cache`)."""
        if self.shared_storage and not storage.is_uri(self.shared_storage):
            return Path(self.shared_storage) / "cache"
        return self.root / "cache"

    @property
    def published_cache(self) -> str | None:
        return storage.join(self.shared_storage, "cache") if self.shared_storage and storage.is_uri(self.shared_storage) \
            else None


def ray_checkpoints(run_location: str) -> list[str]:
    """A Ray Train run's checkpoint_<time>/ folders, oldest first (the run dir also holds checkpoint_*.json files);
    paths or URIs, whichever the storage is."""
    return [storage.join(run_location, name) for name in storage.subdirectories(run_location, "checkpoint_")]


def check_cluster(ws: Workspace) -> None:
    """A multi-node cluster cannot use the driver's disk: refuse local tracking and node-local storage up front."""
    import ray

    nodes = [n for n in ray.nodes() if n.get("Alive")]
    if len(nodes) < 2:
        return
    problems = []
    if ws.is_local_tracking:
        problems.append(f"--tracking-uri: {ws.tracking_uri} is a file on the driver's disk, which workers on the "
                        f"other {len(nodes) - 1} node(s) cannot write; start `mlflow server --backend-store-uri ... "
                        "--artifacts-destination ... --host 0.0.0.0` and pass --tracking-uri http://HOST:5000")
    if ws.shared_storage is None:
        problems.append(f"--storage-path: checkpoints and prepared data would go to {ws.root}, node-local on a "
                        f"{len(nodes)}-node cluster; pass --storage-path on storage every node reaches: an NFS/EFS mount "
                        "or an object-store URI (s3://bucket/dir, gs://...)")
    if problems:
        raise StudyError("cluster", problems)


def connect_if_remote(ws: Workspace, address: str | None, verbose: bool) -> None:
    """Join an existing cluster (--address or RAY_ADDRESS, as under `ray job submit`) and check it can run the
    study before anything is written; a local Ray (no address) is started lazily, only if cells remain."""
    if address or os.environ.get("RAY_ADDRESS"):
        init_ray(address, verbose)
        check_cluster(ws)


@dataclass
class StudyOutcome:
    experiment_id: str
    parent_run_id: str
    finished: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)
    failed: dict[str, str] = field(default_factory=dict)  # cell id -> reason
    table_path: Path | None = None
    summarization_report: Path | None = None
    timings: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class PreparedDataset:
    path: str
    fingerprint: str
    vocab_size: int
    domains: tuple[str, ...]


def prepare_datasets(study: Study, ws: Workspace) -> dict[DatasetEntry, PreparedDataset]:
    """Prepare every dataset once (cached by content); with object-store storage, publish the files there for the
    workers (PreparedDataset.path is then a URI that `storage.local_copy` fetches)."""
    from moe_data.prepare import load_prepared, prepare

    prepared = {}
    for entry in study.datasets:
        path = prepare(entry.name, entry.vocab_size, entry.max_chars_per_domain, ws.cache_dir,
                       text_column=entry.text_column, domain_column=entry.domain_column, hf_config=entry.hf_config,
                       summary_column=entry.summary_column)
        data = load_prepared(path)
        location = str(path)
        if ws.published_cache:
            location = storage.join(ws.published_cache, path.name)
            storage.upload(path, location)
        prepared[entry] = PreparedDataset(location, data.fingerprint, data.vocab_size, tuple(data.domains))
    return prepared


def summarization_texts(prepared: dict[DatasetEntry, PreparedDataset]) -> dict[str, tuple[list[str], list[str]]]:
    """dataset name -> test (documents, reference summaries), for the samples table and the rating sheet."""
    from moe_data.prepare import load_prepared

    texts = {}
    for entry, dataset in prepared.items():
        if entry.task == "summarization":
            data = load_prepared(storage.local_copy(dataset.path))
            texts[entry.name] = (data.documents["test"], data.summaries["test"])
    return texts


def check_domain_labels(cells: list[Cell], prepared: dict[DatasetEntry, PreparedDataset]) -> None:
    """Routers that route by domain label need labelled data: say so before anything launches."""
    from moe_models.routers import ROUTERS

    problems = []
    for cell in cells:
        if cell.router.name in ROUTERS and ROUTERS.get(cell.router.name).needs_domains:
            if not prepared[cell.dataset].domains:
                problems.append(f"router {cell.router.display()!r} routes by domain label, but dataset "
                                f"{cell.dataset.name!r} has none (set datasets[].domain_column or use builtin:domains)")
    if problems:
        raise StudyError("study", sorted(set(problems)))


def provenance_tags(data: PreparedDataset) -> dict[str, str]:
    return {"git_commit": git_commit(), "dataset_fingerprint": data.fingerprint,
            **{f"version.{k}": v for k, v in package_versions().items()}}


def cell_tags(cell: Cell, data: PreparedDataset) -> dict[str, str]:
    return {"router": cell.router.display(), "model": cell.model.display(), "dataset": cell.dataset.name,
            "seed": str(cell.seed), **provenance_tags(data)}


def init_ray(address: str | None, verbose: bool = False) -> None:
    import ray

    if ray.is_initialized():
        return
    # Worker logs stay in Ray's session logs unless asked for: a failed cell's error reaches the driver anyway.
    # Workers must import moelab's packages; a cluster gets them through `ray job submit --working-dir`.
    # The dashboard stays on: Ray Train's PlacementGroupCleaner needs the State API to free the workers of a
    # trial that Tune stopped early (without it, ASHA-stopped trials leak their CPUs).
    # No address and no RAY_ADDRESS: a Ray of our own ("local"), never one left running on this machine, which
    # `ray.init()` would otherwise find through /tmp/ray and join.
    address = address or os.environ.get("RAY_ADDRESS") or "local"
    ray.init(address=address, logging_level=logging.WARNING, log_to_driver=verbose,
             runtime_env={"env_vars": {"PYTHONWARNINGS": "ignore::DeprecationWarning"}})


def run_study(study: Study, ws: Workspace, address: str | None = None,
              echo: Callable[[str], None] = print, verbose: bool = False) -> StudyOutcome:
    began = time.perf_counter()
    connect_if_remote(ws, address, verbose)
    ws.root.mkdir(parents=True, exist_ok=True)
    tracker = Tracker(ws.tracking_uri)
    # Created once from the driver before any cell starts: concurrent first writers would race on SQLite.
    experiment_id = tracker.experiment(study.name, ws.artifact_location)
    parent = tracker.study_run(experiment_id, study.name, {"git_commit": git_commit()})
    tracker.log_text(parent, study.model_dump_json(indent=2), "study.json")
    outcome = StudyOutcome(experiment_id, parent)

    prepared = prepare_datasets(study, ws)
    outcome.timings["prepare_data_s"] = time.perf_counter() - began
    cells = expand(study)
    check_domain_labels(cells, prepared)
    existing = tracker.cell_runs(experiment_id)
    todo: list[tuple[Cell, str]] = []
    for cell in cells:
        run_id = _open_run(tracker, existing.get(cell.id), outcome, cell.id, lambda cell=cell: _new_cell_run(
            tracker, experiment_id, parent, cell, prepared[cell.dataset]))
        if run_id:
            todo.append((cell, run_id))
    existing = tracker.cell_runs(experiment_id, role="pretrained")
    pretrained: list[tuple[PretrainedCell, str]] = []
    for cell in pretrained_cells(study):
        run_id = _open_run(tracker, existing.get(cell.id), outcome, cell.id, lambda cell=cell: tracker.create_cell_run(
            experiment_id, parent, cell.id, f"{cell.baseline.display()}-pretrained",
            {"router": cell.baseline.display(), "dataset": cell.dataset.name,
             **provenance_tags(prepared[cell.dataset])}, flatten(cell.resolved()), role="pretrained"))
        if run_id:
            pretrained.append((cell, run_id))
    echo(f"study {study.name}: {len(cells)} cells + {len(pretrained_cells(study))} pretrained baselines, "
         f"{len(outcome.skipped)} already finished, {len(todo) + len(pretrained)} to run")

    t_ray = time.perf_counter()
    if todo or pretrained:
        init_ray(address, verbose)
    outcome.timings["ray_init_s"] = time.perf_counter() - t_ray
    t_cells = time.perf_counter()
    try:
        _run_cells(todo, study, ws, prepared, tracker, outcome, echo)
        _run_pretrained(pretrained, study, ws, prepared, tracker, outcome, echo)
    except KeyboardInterrupt:
        # Unfinished cells keep their checkpoints and MLflow runs; the same command resumes them.
        for cell, run_id in [*todo, *pretrained]:
            if cell.id not in outcome.finished and cell.id not in outcome.failed:
                tracker.finish(run_id, "KILLED", "interrupted; run the same command again to resume")
        tracker.finish(parent, "KILLED")
        echo("interrupted: unfinished cells were marked KILLED; run the same command again to resume")
        raise
    outcome.timings["cells_s"] = time.perf_counter() - t_cells

    runs = tracker.cell_runs(experiment_id)
    outcome.table_path = write_table(table_rows(cells, runs), ws.root / study.name, tracker, parent)
    outcome.summarization_report = write_summarization_report(
        study, cells, runs, tracker, summarization_texts(prepared), ws.root, parent,
        tracker.cell_runs(experiment_id, role="pretrained"))
    tracker.finish(parent, "FAILED" if outcome.failed else "FINISHED")
    outcome.timings["total_s"] = time.perf_counter() - began
    return outcome


def _open_run(tracker: Tracker, run, outcome: StudyOutcome, cell_id: str, create: Callable[[], str]) -> str | None:
    """The MLflow run a cell (re)runs in — reopened, or created — or None when it already FINISHED."""
    if run is not None and run.info.status == "FINISHED":
        outcome.skipped.append(cell_id)
        return None
    if run is not None:
        tracker.reopen(run.info.run_id)
        return run.info.run_id
    return create()


def _new_cell_run(tracker: Tracker, experiment_id: str, parent: str, cell: Cell, data: PreparedDataset) -> str:
    run_id = tracker.create_cell_run(experiment_id, parent, cell.id, f"{cell.router.display()}-s{cell.seed}",
                                     cell_tags(cell, data), flatten(cell.resolved()))
    tracker.log_text(run_id, json.dumps(cell.resolved(), indent=2), "config/resolved_config.json")
    return run_id


def _run_pretrained(pending: list[tuple[PretrainedCell, str]], study: Study, ws: Workspace,
                    prepared: dict[DatasetEntry, PreparedDataset], tracker: Tracker, outcome: StudyOutcome,
                    echo: Callable[[str], None]) -> None:
    """Evaluation-only cells, as Ray tasks of one worker's resources each."""
    import ray

    task = ray.remote(num_cpus=study.resources.cpus_per_worker, num_gpus=study.resources.gpus_per_worker,
                      max_retries=0)(evaluate_pretrained)
    refs = {}
    for cell, run_id in pending:
        payload = {"baseline": cell.baseline.model_dump(), "dataset": cell.dataset.model_dump(),
                   "summarization": cell.summarization.model_dump(), "data_path": prepared[cell.dataset].path,
                   "tracking_uri": ws.tracking_uri, "run_id": run_id}
        refs[task.remote(payload)] = (cell, run_id, time.perf_counter())
        echo(f"  started  {cell.id}  {cell.title}")
    for ref, (cell, run_id, started) in refs.items():
        result = ray.get(ref)
        tracker.finish(run_id, result["status"], result["reason"])
        if result["status"] == "FINISHED":
            outcome.finished.append(cell.id)
            echo(f"  finished {cell.id}  {cell.title}  ({time.perf_counter() - started:.1f}s)")
        else:
            outcome.failed[cell.id] = result["reason"]
            echo(f"  FAILED   {cell.id}  {cell.title}: {result['reason']}")


def _run_cells(todo: list[tuple[Cell, str]], study: Study, ws: Workspace, prepared: dict[DatasetEntry, PreparedDataset],
               tracker: Tracker, outcome: StudyOutcome, echo: Callable[[str], None]) -> None:
    import ray

    from workflows.launch import CellResult, fit_cell_remote

    queue = list(todo)
    running: dict = {}  # ray ObjectRef -> (cell, run_id, start time)
    while queue or running:
        while queue and len(running) < study.resources.max_concurrent_cells:
            cell, run_id = queue.pop(0)
            payload = {"cell": cell.resolved(), "data_path": prepared[cell.dataset].path,
                       "tracking_uri": ws.tracking_uri, "run_id": run_id}
            ref = fit_cell_remote.remote(cell.id, payload, study.resources, ws.cell_storage(study.name))
            running[ref] = (cell, run_id, time.perf_counter())
            echo(f"  started  {cell.id}  {cell.title}")
        done, _ = ray.wait(list(running), num_returns=1)
        cell, run_id, started = running.pop(done[0])
        result = ray.get(done[0])
        if result.status == "FINISHED" and (reason := tracker.failure_reason(run_id)):
            result = CellResult("FAILED", reason, result.metrics)  # the cell stopped itself (e.g. NaN loss)
        tracker.finish(run_id, result.status, result.reason)
        seconds = time.perf_counter() - started
        if result.status == "FINISHED":
            outcome.finished.append(cell.id)
            echo(f"  finished {cell.id}  {cell.title}  ({seconds:.1f}s, eval loss {result.metrics.get('eval_loss', float('nan')):.4f})")
        else:
            outcome.failed[cell.id] = result.reason or "unknown"
            echo(f"  FAILED   {cell.id}  {cell.title}: {result.reason}")


def write_table(rows: list[dict], stem: Path, tracker: Tracker | None = None, parent_run_id: str | None = None) -> Path:
    md, csv_path = stem.with_name(stem.name + "_table.md"), stem.with_name(stem.name + "_table.csv")
    md.write_text(to_markdown(rows))
    csv_path.write_text(to_csv(rows))
    if tracker and parent_run_id:
        tracker.log_artifact(parent_run_id, md, "tables")
        tracker.log_artifact(parent_run_id, csv_path, "tables")
    return md
