"""What the driver hands a worker: one typed, frozen job per Ray Train run (a grid cell, or a sweep's trial) and per
pretrained-baseline evaluation. The only edge between driver code (workflows/driver, tuning) and worker code
(workflows/cell): no dict of string keys crosses it. Jobs pickle (Ray ships them) and round-trip through JSON
(`to_json` / `from_json`, for logs and for tests that hold the edge to its record)."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any, Literal

from workflows.study.cells import Cell, PretrainedCell
from workflows.study.entries import DatasetEntry
from workflows.study.sections import PretrainedBaseline, SummarizationConfig


@dataclass(frozen=True)
class CellJob:
    cell: Cell
    data_path: str  # the prepared data: a local path, or an object-store URI fetched once per node
    tracking_uri: str
    run_id: str  # the cell's MLflow run, created (or reopened) by the driver; rank 0 logs to it
    export_checkpoint: bool = False  # another cell of the study starts from this one: log its final model
    source_run_id: str | None = None  # the run whose exported model this cell starts from (`pretrained: cell:...`)
    # A sweep's metric: the trial's run logs it first, at step 0, since MLflow's compare view charts a run's first
    # metric by default and a sweep's trials are compared on this one.
    first_metric: str | None = None

    def to_json(self) -> str:
        return json.dumps({**self.__dict__, "cell": self.cell.resolved()}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "CellJob":
        fields = json.loads(text)
        return cls(**{**fields, "cell": Cell.from_resolved(fields["cell"])})


@dataclass(frozen=True)
class PretrainedJob:
    cell: PretrainedCell
    data_path: str
    tracking_uri: str
    run_id: str

    def to_json(self) -> str:
        cell = {"baseline": self.cell.baseline.model_dump(), "dataset": self.cell.dataset.model_dump(),
                "summarization": self.cell.summarization.model_dump()}
        return json.dumps({**self.__dict__, "cell": cell}, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "PretrainedJob":
        fields = json.loads(text)
        cell = PretrainedCell(PretrainedBaseline.model_validate(fields["cell"]["baseline"]),
                              DatasetEntry.model_validate(fields["cell"]["dataset"]),
                              SummarizationConfig.model_validate(fields["cell"]["summarization"]))
        return cls(**{**fields, "cell": cell})


@dataclass(frozen=True)
class JobResult:
    """How a job ended, as the driver records it on the job's run."""

    status: Literal["FINISHED", "FAILED"]
    reason: str | None = None
    metrics: dict[str, Any] = field(default_factory=dict)  # a cell's last report to Ray Train
