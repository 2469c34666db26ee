"""A model handed from one cell to the next (`pretrained: cell:<model>/<router>`), in a worker: the source cell logs
its final model to its MLflow run in the Hugging Face format; the cell that starts from it downloads that folder.
MLflow's artifact store carries it, so the same works on one machine and across a cluster's nodes."""
from __future__ import annotations

import tempfile
from pathlib import Path

from workflows.cell.worker import Worker
from workflows.study.cells import Cell
from workflows.tracking import CHECKPOINT_ARTIFACT, Tracker


def fetch_source_checkpoint(tracking_uri: str, run_id: str | None, into: Path) -> str | None:
    """Every rank: the exported checkpoint of the source cell's run `run_id`, as a local folder (None when the cell
    has no source)."""
    if not run_id:
        return None
    try:
        return str(Tracker(tracking_uri).download_folder(run_id, CHECKPOINT_ARTIFACT, into))
    except Exception as err:  # an MLflow error names no cell: say which source is missing what
        raise RuntimeError(f"the source cell's run {run_id} has no {CHECKPOINT_ARTIFACT}/ artifact to start from "
                           f"(was it finished before it became a source? rerun it): {err}") from err


def exported_state(module) -> dict:
    """Every rank, after the last step of a source cell: its model's tensors in the Hugging Face layout (the
    experts gathered over the expert-parallel group, a collective)."""
    from moe_models.pretrained.export import exported_state as state_of

    return state_of(module)


def log_final_checkpoint(module, state: dict, cell: Cell, vocab_size: int, w: Worker) -> None:
    """Rank 0: the exported tensors (`exported_state`) as a save_pretrained folder on the source cell's run."""
    from moe_models.pretrained.export import write

    with tempfile.TemporaryDirectory() as tmp:
        write(module.opts, state, cell.router.routing_spec(), vocab_size,
              max(cell.training.seq_len, cell.training.target_len), Path(tmp))
        w.tracker.log_folder(w.run_id, tmp, CHECKPOINT_ARTIFACT)
