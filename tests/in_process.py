"""A one-cell study's worker code in this process, without Ray: the study file's validation, data preparation and the
cell's DeepSpeed engine, for tests that step `train_step` / `evaluate` themselves."""
from __future__ import annotations

from dataclasses import replace

from moe_data.prepare import load_prepared
from workflows.cell.engine import build_engine
from workflows.driver.data import prepare_datasets
from workflows.driver.workspace import Workspace
from workflows.driver.trained_states import _single_process_group
from workflows.study.cells import Cell, expand
from workflows.study.loading import parse_study


def in_process_cell(tmp_path, study: dict, unvalidated: dict | None = None) -> tuple[object, Cell, object]:
    """(engine, cell, data) of a study file with one router, model and dataset. `unvalidated`: training fields set
    after validation, for cells the study validator refuses."""
    parsed = parse_study({"name": "in_process", **study})
    (cell,) = expand(parsed)
    cell = replace(cell, training=cell.training.model_copy(update=unvalidated or {}))
    data = load_prepared(prepare_datasets(parsed, Workspace.resolve(tmp_path, None))[cell.dataset].path)
    _single_process_group()
    return build_engine(cell, data), cell, data
