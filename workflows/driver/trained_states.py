"""A trained cell loaded back: its hidden states, for characterizing routers on real activations (`moelab routers
--study`), and its engine, for calibrating its router's knob (`moelab calibrate`).

The router-architectures report swaps routers into pretrained models and characterizes them on real hidden states.
Here the pretrained model is a finished cell of a study: its latest DeepSpeed checkpoint is loaded into a one-process
engine (gloo, CPU), and the inputs of its first MoE block are captured on validation text.
"""
from __future__ import annotations

import os
import socket
import tempfile
from pathlib import Path
from typing import Callable

import torch

from workflows import storage
from workflows.driver.data import prepare_datasets
from workflows.driver.workspace import ray_checkpoints, Workspace
from workflows.study.cells import Cell, expand
from workflows.study.errors import StudyError
from workflows.study.schema import Study
from workflows.tracking import Tracker


def finished_cell_with_checkpoint(study: Study, ws: Workspace, wanted: Callable[[Cell], bool] | None = None,
                                  what: str = "MoE cell") -> tuple[Cell, str]:
    """The first finished cell (of those `wanted`; default: any MoE cell) and its latest checkpoint."""
    tracker = Tracker(ws.tracking_uri)
    found = tracker.client.get_experiment_by_name(study.name)
    runs = tracker.cell_runs(found.experiment_id) if found else {}
    for cell in expand(study):
        if not (wanted(cell) if wanted else cell.router.name != "dense"):
            continue
        run = runs.get(cell.id)
        checkpoints = ray_checkpoints(storage.join(ws.cell_storage(study.name), cell.id))
        if run is not None and run.info.status == "FINISHED" and checkpoints:
            return cell, checkpoints[-1]
    raise StudyError(study.name, [f"no finished {what} with a checkpoint under {ws.storage_path}; run the study "
                                  "first (`moelab run`)"])


def load_trained_engine(study: Study, ws: Workspace, cell: Cell, checkpoint: str):
    """(a one-process DeepSpeed engine in eval mode holding the cell's checkpoint, the cell's prepared data)."""
    from moe_data.prepare import load_prepared
    from workflows.cell.engine import build_engine

    data = load_prepared(storage.local_copy(prepare_datasets(study, ws)[cell.dataset].path))
    _single_process_group()
    with tempfile.TemporaryDirectory() as source_dir:  # a `pretrained: cell:...` model is built as its worker built it
        engine = build_engine(cell, data, source_checkpoint(study, ws, cell, Path(source_dir)))
    import ray.train

    with ray.train.Checkpoint(checkpoint).as_directory() as local:  # a path, or a URI downloaded to a temp dir
        loaded, _ = engine.load_checkpoint(local)
    if loaded is None:
        raise RuntimeError(f"DeepSpeed could not load {checkpoint}")
    engine.eval()
    return engine, data


def source_checkpoint(study: Study, ws: Workspace, cell: Cell, into: Path) -> str | None:
    """The exported checkpoint of the cell this one started from (`pretrained: cell:...`), fetched into `into` from
    the source cell's run as the worker fetched it (workflows/cell/handoff.py); None for a cell without a source."""
    if cell.source_id is None:
        return None
    from workflows.cell.handoff import fetch_source_checkpoint

    tracker = Tracker(ws.tracking_uri)
    source_run = tracker.cell_runs(tracker.client.get_experiment_by_name(study.name).experiment_id).get(cell.source_id)
    if source_run is None:
        raise StudyError(study.name, [f"{cell.title} starts from cell {cell.source_id}, which has no run here"])
    return fetch_source_checkpoint(ws.tracking_uri, source_run.info.run_id, into)


def _single_process_group() -> None:
    if torch.distributed.is_initialized():
        return
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    torch.distributed.init_process_group("gloo", rank=0, world_size=1)


def trained_hidden_states(study: Study, ws: Workspace, tokens: int) -> tuple[torch.Tensor, torch.Tensor,
                                                                                torch.Tensor, int, int, str]:
    """(x_TD, token_ids_T, domain_ids_T, num_experts, vocab_size, cell title) at the first MoE block's input."""
    from moe_models.moe_ffn import MoEFeedForward

    cell, checkpoint = finished_cell_with_checkpoint(study, ws)
    engine, data = load_trained_engine(study, ws, cell, checkpoint)
    moe = next(m for m in engine.module.modules() if isinstance(m, MoEFeedForward))
    captured: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []
    # (x, token ids, domain ids: zeros for unlabelled data such as summarization pairs) entering the block; the ids
    # are what the model fed the block's MoERecorder for this forward
    def capture(block: MoEFeedForward, args: tuple) -> None:
        inputs = block.recorder.inputs
        domains = inputs.domain_ids_BS if inputs.domain_ids_BS is not None else torch.zeros_like(inputs.token_ids_BS)
        captured.append((args[0].detach(), inputs.token_ids_BS, domains))

    hook = moe.register_forward_pre_hook(capture)
    gen = torch.Generator().manual_seed(0)
    t = cell.training
    with torch.no_grad():
        while sum(c[1].numel() for c in captured) < tokens:
            batch = data.sample("validation", t.micro_batch_size, gen, t.seq_len, t.target_len)
            engine(*batch.to(engine.device).inputs)
    hook.remove()
    # On the host, where the router profiles run, whichever device the engine used.
    x_TD = torch.cat([c[0].reshape(-1, c[0].shape[-1]) for c in captured])[:tokens].float().cpu()
    ids_T = torch.cat([c[1].reshape(-1) for c in captured])[:tokens].cpu()
    dom_T = torch.cat([c[2].reshape(-1) for c in captured])[:tokens].clamp(min=0).cpu()
    return x_TD, ids_T, dom_T, moe.router.ctx.num_experts, data.vocab_size, cell.title
