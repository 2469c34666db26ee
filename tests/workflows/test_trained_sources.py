"""A finished cell loaded back on the driver (`moelab calibrate`, `moelab routers --study`) is built as its worker
built it: a cell that started from another (`pretrained: cell:...`) gets that cell's exported checkpoint, found by
the source cell's id in the study's MLflow store."""
from __future__ import annotations

from pathlib import Path

import pytest

from tests.workflows.test_hf_models import UPCYCLE
from workflows.driver.trained_states import source_checkpoint
from workflows.driver.workspace import Workspace
from workflows.study.cells import expand
from workflows.study.errors import StudyError
from workflows.study.loading import parse_study
from workflows.tracking import CHECKPOINT_ARTIFACT, Tracker


def logged_folder(tracker: Tracker, run_id: str, folder: Path, config: str) -> None:
    folder.mkdir()
    (folder / "config.json").write_text(config)
    tracker.log_folder(run_id, folder, CHECKPOINT_ARTIFACT)


def test_an_upcycled_cell_is_built_from_its_source_cells_exported_checkpoint(tmp_path):
    study = parse_study(UPCYCLE)
    cells = expand(study)
    upcycled = next(c for c in cells if c.source_id is not None)
    source = next(c for c in cells if c.id == upcycled.source_id)
    ws = Workspace.resolve(tmp_path / "work", None)
    tracker = Tracker(ws.tracking_uri)
    experiment = tracker.experiment(study.name, (tmp_path / "artifacts").as_uri())
    parent = tracker.study_run(experiment, study.name, {})
    # The upcycled cell's own export is there too: the one fetched must be its source's.
    logged_folder(tracker, tracker.create_cell_run(experiment, parent, upcycled.id, upcycled.title, {}, {}),
                  tmp_path / "own", '{"model_type": "mixtral"}')
    logged_folder(tracker, tracker.create_cell_run(experiment, parent, source.id, source.title, {}, {}),
                  tmp_path / "exported", '{"model_type": "llama"}')

    folder = Path(source_checkpoint(study, ws, upcycled, tmp_path / "fetched"))
    assert folder.is_relative_to(tmp_path / "fetched") and (folder / "config.json").read_text() == \
        '{"model_type": "llama"}'
    assert source_checkpoint(study, ws, source, tmp_path / "none") is None  # a cell without a source


def test_a_source_cell_without_a_run_is_named(tmp_path):
    study = parse_study(UPCYCLE)
    upcycled = next(c for c in expand(study) if c.source_id is not None)
    ws = Workspace.resolve(tmp_path / "work", None)
    Tracker(ws.tracking_uri).experiment(study.name, (tmp_path / "artifacts").as_uri())
    with pytest.raises(StudyError, match=f"starts from cell {upcycled.source_id}, which has no run here"):
        source_checkpoint(study, ws, upcycled, tmp_path / "fetched")
