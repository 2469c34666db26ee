"""Expand a study into cells (router x model x dataset x seed), each with a stable id; and its pretrained baselines
into evaluation-only cells.

The id is a hash of the cell's fully resolved config (defaults filled in), so re-running a study finds the same
cells, and changing anything that affects training — a router option, the lr, the number of workers — makes a new cell.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, replace
from itertools import product
from typing import Any

from moe_models.pretrained.source import cell_source
from workflows.study.entries import DatasetEntry, ModelEntry, RouterEntry
from workflows.study.identity import identity, left_out
from workflows.study.schema import Study
from workflows.study.sections import PretrainedBaseline, ResourcesConfig, SummarizationConfig, TrainingConfig


@dataclass(frozen=True)
class Cell:
    router: RouterEntry
    model: ModelEntry
    dataset: DatasetEntry
    seed: int
    training: TrainingConfig
    resources: ResourcesConfig
    summarization: SummarizationConfig | None = None  # how a summarization cell is evaluated (None for LM cells)
    # The id of the cell whose final model this one starts from (`pretrained: cell:<model>/<router>`): part of this
    # cell's identity, so retraining the source retrains what starts from it.
    source_id: str | None = None

    def resolved(self) -> dict[str, Any]:
        """JSON-ready config with every default filled in: what the id hashes and what MLflow records."""
        return {
            "router": self.router.resolved(),
            "model": self.model.resolved(),
            "dataset": self.dataset.model_dump(),
            "seed": self.seed,
            "training": self.training.model_dump(),
            "resources": self.resources.model_dump(),
            **({"summarization": self.summarization.model_dump()} if self.summarization else {}),
            **({"source_cell": self.source_id} if self.source_id else {}),
        }

    @property
    def id(self) -> str:
        """A hash of the fields each section declares part of a cell's identity (workflows/study/identity.py)."""
        resolved = self.resolved()
        sections = {"router": self.router, "model": self.model, "dataset": self.dataset, "training": self.training,
                    "resources": self.resources, "summarization": self.summarization}
        key = {name: identity(sections[name], value) if name in sections else value for name, value in resolved.items()}
        # A router's and a model's options are inline in their records; they declare their identity themselves.
        for name, options in (("router", self.router.routing_spec().options), ("model", self.model.resolved_options())):
            if options is not None:
                key[name] = {k: v for k, v in key[name].items() if k not in left_out(options)}
        blob = json.dumps(key, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:12]

    @property
    def title(self) -> str:
        return f"{self.router.display()} / {self.model.display()} / {self.dataset.name} / seed {self.seed}"

    @classmethod
    def from_resolved(cls, resolved: dict[str, Any]) -> "Cell":
        router = dict(resolved["router"])
        model = dict(resolved["model"])
        return cls(RouterEntry.model_validate(router), ModelEntry.model_validate(model),
                   DatasetEntry.model_validate(resolved["dataset"]), int(resolved["seed"]),
                   TrainingConfig.model_validate(resolved["training"]),
                   ResourcesConfig.model_validate(resolved["resources"]),
                   SummarizationConfig.model_validate(resolved["summarization"]) if "summarization" in resolved else None,
                   resolved.get("source_cell"))


def _training_for(study: Study, router: RouterEntry) -> TrainingConfig:
    fault = study.fault_injection
    if fault and (not fault.routers or router.display() in fault.routers):
        return study.training.model_copy(update={"inject_nan_at_step": fault.nan_at_step})
    return study.training


def expand(study: Study) -> list[Cell]:
    """Every cell, sources before the cells that start from them (a source is never itself an `hf` cell). Linear in
    the number of cells, with the per-entry work (training per router, evaluation per dataset) done once."""
    training = {id(r): _training_for(study, r) for r in study.routers}
    summarization = {id(d): study.summarization if d.task == "summarization" else None for d in study.datasets}
    cells = [Cell(r, m, d, s, training[id(r)], study.resources, summarization[id(d)])
             for d, m, r, s in product(study.datasets, study.models, study.routers, study.seeds) if m.crossed_with(r)]
    if not any(m.name == "hf" for m in study.models):
        return cells
    by_key = {(c.model.display(), c.router.display(), c.dataset, c.seed): c for c in cells}
    linked = []
    for cell in cells:
        source = cell_source(cell.model.options["pretrained"]) if cell.model.name == "hf" else None
        if source:
            cell = replace(cell, source_id=by_key[(source.model_label, source.router_label, cell.dataset,
                                                   cell.seed)].id)
        linked.append(cell)
    return sorted(linked, key=lambda c: c.source_id is not None)  # stable: the study's order otherwise


@dataclass(frozen=True)
class PretrainedCell:
    baseline: PretrainedBaseline
    dataset: DatasetEntry
    summarization: SummarizationConfig

    def resolved(self) -> dict:
        return {"pretrained": self.baseline.model_dump(), "dataset": self.dataset.model_dump(),
                "summarization": identity(self.summarization, self.summarization.model_dump())}

    @property
    def id(self) -> str:
        blob = json.dumps({**self.resolved(), "pretrained": identity(self.baseline, self.baseline.model_dump())},
                          sort_keys=True)
        return "pt-" + hashlib.sha256(blob.encode()).hexdigest()[:9]

    @property
    def title(self) -> str:
        return f"{self.baseline.display()} (pretrained) / {self.dataset.name}"


def pretrained_cells(study) -> list[PretrainedCell]:
    """Every pretrained baseline on every summarization dataset of the study."""
    return [PretrainedCell(baseline, dataset, study.summarization) for dataset in study.datasets
            if dataset.task == "summarization" for baseline in study.summarization.pretrained]
