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
        identity = self.resolved()
        identity["router"].pop("label")  # display names do not change what is trained
        identity["model"].pop("label")
        # Only the worker count changes the result (global batch); CPUs/concurrency/retries do not.
        identity["resources"] = {"workers_per_cell": self.resources.workers_per_cell}
        # torch.compile changes how a cell runs, not what it trains (a test holds both to the same curve): turning it
        # on for a study in progress keeps its finished cells.
        identity["training"].pop("compile")
        if self.training.batching == "random":  # the order every cell had before the option existed: same ids
            identity["training"].pop("batching")
        if self.training.precision != "fp16":  # the loss scale exists only in fp16
            identity["training"].pop("fp16_initial_scale_power")
        for presentation_only in ("baseline", "samples", "pretrained"):  # not what this cell trains or scores
            identity.get("summarization", {}).pop(presentation_only, None)
        blob = json.dumps(identity, sort_keys=True, default=str)
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
    """Every cell, sources before the cells that start from them (a source is never itself an `hf` cell)."""
    cells = [Cell(r, m, d, s, _training_for(study, r), study.resources,
                  study.summarization if d.task == "summarization" else None)
             for d, m, r, s in product(study.datasets, study.models, study.routers, study.seeds) if m.crossed_with(r)]
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
        cfg = self.summarization.model_dump(exclude={"baseline", "samples", "pretrained"})
        return {"pretrained": self.baseline.model_dump(), "dataset": self.dataset.model_dump(), "summarization": cfg}

    @property
    def id(self) -> str:
        blob = json.dumps({**self.resolved(), "pretrained": self.baseline.model_dump(exclude={"label"})},
                          sort_keys=True)
        return "pt-" + hashlib.sha256(blob.encode()).hexdigest()[:9]

    @property
    def title(self) -> str:
        return f"{self.baseline.display()} (pretrained) / {self.dataset.name}"


def pretrained_cells(study) -> list[PretrainedCell]:
    """Every pretrained baseline on every summarization dataset of the study."""
    return [PretrainedCell(baseline, dataset, study.summarization) for dataset in study.datasets
            if dataset.task == "summarization" for baseline in study.summarization.pretrained]
