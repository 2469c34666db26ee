"""Datasets prepared once on the driver (cached by content, published to object storage when the workers read
there), and the checks that need the prepared data."""
from __future__ import annotations

from dataclasses import dataclass

from workflows import storage
from workflows.driver.ray_cluster import init_ray
from workflows.driver.workspace import Workspace
from workflows.study.cells import Cell
from workflows.study.entries import DatasetEntry
from workflows.study.errors import StudyError
from workflows.study.schema import Study


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
        if entry.task == "lm" and not entry.name.startswith("builtin:"):
            init_ray(None)  # a Ray Data job: the study's own Ray (joined already on a cluster), started once
        path = prepare(entry.data_spec(), ws.cache_dir)
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
    from moe_models.routers import ROUTER_OPTIONS

    problems = []
    for cell in cells:
        if cell.router.name in ROUTER_OPTIONS and ROUTER_OPTIONS.get(cell.router.name).needs_domains:
            if not prepared[cell.dataset].domains:
                problems.append(f"router {cell.router.display()!r} routes by domain label, but dataset "
                                f"{cell.dataset.name!r} has none (set datasets[].domain_column or use builtin:domains)")
        if cell.training.batching == "by_domain" and not prepared[cell.dataset].domains:
            problems.append(f"training.batching: by_domain draws each micro-batch from one domain, but dataset "
                            f"{cell.dataset.name!r} has no domain labels (set datasets[].domain_column or use "
                            "builtin:domains)")
    if problems:
        raise StudyError("study", sorted(set(problems)))
