"""Load an MoE checkpoint without holding every expert: the model is built on the meta device, its dense tensors are
read from the safetensors shards by name, one at a time, and each rank reads only its own experts (DeepSpeed's
placement: global experts [r*n, (r+1)*n) on expert-parallel rank r). A rank's expert memory then scales with
1/ep_size, where `from_pretrained` would hold all of them before router swap sliced out the rank's share.

Checkpoints store a block's experts one of two ways, both read here by tensor name:
  * one tensor per expert and projection (the hub's layout: Qwen-MoE, OLMoE, DeepSeek-V3, GLM-4-MoE: gate_proj,
    up_proj, down_proj; Mixtral: w1, w3, w2 under block_sparse_moe);
  * stacked tensors (GPT-OSS: experts.gate_up_proj (E, D, 2F) with biases), of which a rank reads its rows.
A checkpoint this module cannot map tensor for tensor, or not in safetensors, is loaded whole by `from_pretrained`
instead (`load_without_experts` returns None)."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace
from typing import Iterator

import torch
from torch import nn

from moe_models.pretrained.router_swap import CheckpointExperts, expert_activation, expert_weights

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"
# Per-expert projection names, (gate, up, down): transformers' and Mixtral's (w1 gate, w3 up, w2 down).
PER_EXPERT_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))
# The module path a checkpoint may name differently: Mixtral's MoE block is `mlp` in transformers 5,
# `block_sparse_moe` in its checkpoints.
CHECKPOINT_ALIASES = ((".mlp.", ".block_sparse_moe."),)


class CheckpointTensors:
    """A local safetensors checkpoint (one file, or shards with an index), read tensor by tensor on demand.
    `reads` names every tensor read, in order: what a rank held at some point while loading."""

    def __init__(self, folder: Path):
        from safetensors import safe_open

        self._safe_open = safe_open
        self.folder = folder
        if (folder / INDEX).exists():
            self.files = dict(json.loads((folder / INDEX).read_text())["weight_map"])
        else:
            with safe_open(folder / SINGLE, "pt") as f:
                self.files = dict.fromkeys(f.keys(), SINGLE)
        self._handles: dict[str, object] = {}
        self.reads: list[str] = []

    @staticmethod
    def present(folder: Path) -> bool:
        return (folder / INDEX).exists() or (folder / SINGLE).exists()

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def _handle(self, name: str):
        file = self.files[name]
        if file not in self._handles:
            self._handles[file] = self._safe_open(self.folder / file, "pt")
        return self._handles[file]

    def read(self, name: str) -> torch.Tensor:
        self.reads.append(name)
        return self._handle(name).get_tensor(name)

    def read_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        """Rows [start, stop) of dim 0 only: the rest of the tensor is never read."""
        self.reads.append(f"{name}[{start}:{stop}]")
        return self._handle(name).get_slice(name)[start:stop]

    def release(self) -> None:
        """Unmap the shards: pages a read touched count as this process's resident memory while they stay mapped."""
        self._handles.clear()

    def checkpoint_name(self, model_name: str) -> str | None:
        """The checkpoint's name for a tensor of transformers' module tree, or None."""
        if model_name in self.files:
            return model_name
        for ours, theirs in CHECKPOINT_ALIASES:
            alias = model_name.replace(ours, theirs)
            if alias in self.files:
                return alias
        return None


@dataclass(frozen=True)
class ExpertBlock:
    """Where one MoE block's experts are in the checkpoint."""
    prefix: str  # the checkpoint's name of `<block>.experts`
    per_expert: tuple[str, str, str] | None  # (gate, up, down) projection names, or None: stacked tensors


def expert_block(tensors: CheckpointTensors, experts_path: str) -> ExpertBlock | None:
    """How the checkpoint stores the experts of the module at `experts_path` (transformers' name), or None."""
    for prefix in {experts_path, *(experts_path.replace(a, b) for a, b in CHECKPOINT_ALIASES)}:
        for names in PER_EXPERT_NAMES:
            if f"{prefix}.0.{names[0]}.weight" in tensors:
                return ExpertBlock(prefix, names)
        if f"{prefix}.gate_up_proj" in tensors and f"{prefix}.down_proj" in tensors:
            return ExpertBlock(prefix, None)
    return None


def read_experts(tensors: CheckpointTensors, block: ExpertBlock, experts_module: nn.Module, layer_index: int,
                 first: int, count: int, dtype: torch.dtype) -> CheckpointExperts:
    """Experts [first, first + count) of one block, in our layout, at dtype; no other expert is read.
    `experts_module`: transformers' (meta) module, for its activation."""
    if block.per_expert is None:  # stacked: the module's own conversion, applied to the rank's rows
        rows = {name: tensors.read_rows(f"{block.prefix}.{name}", first, first + count).to(dtype)
                for name in ("gate_up_proj", "down_proj", "gate_up_proj_bias", "down_proj_bias")
                if f"{block.prefix}.{name}" in tensors}
        hyper = {k: getattr(experts_module, k) for k in ("alpha", "limit", "act_fn") if hasattr(experts_module, k)}
        return expert_weights(SimpleNamespace(**rows, **hyper), layer_index, first)
    activation = expert_activation(experts_module, layer_index)
    gate, up, down = block.per_expert
    ups, downs = None, None
    for local, e in enumerate(range(first, first + count)):  # into stacks allocated once: no concatenated copies
        g, u, d = (tensors.read(f"{block.prefix}.{e}.{p}.weight") for p in (gate, up, down))
        if ups is None:
            ups = torch.empty(count, 2 * g.shape[0], g.shape[1], dtype=dtype)
            downs = torch.empty(count, *d.shape, dtype=dtype)
        ups[local, :g.shape[0]], ups[local, g.shape[0]:], downs[local] = g, u, d
    return CheckpointExperts(ups, downs, None, None, activation, first)


def lazy_loadable(folder: Path) -> bool:
    """A local safetensors checkpoint (the hub's snapshot folders are too)."""
    return folder.is_dir() and CheckpointTensors.present(folder)


def skeleton(folder: Path, dtype: torch.dtype) -> nn.Module:
    """transformers' model for the checkpoint's config, its parameters on the meta device (no memory); buffers are
    real, so those computed from the config rather than saved (rotary frequencies) are right from the start."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(folder)
    with init_empty_weights(include_buffers=False):
        return AutoModelForCausalLM.from_config(config, dtype=dtype)


def experts_modules(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """(name, module) of every MoE block's stacked experts."""
    for name, module in model.named_modules():
        if name.endswith(".experts") and hasattr(module, "gate_up_proj") and hasattr(module, "down_proj"):
            yield name, module


def load_dense(model: nn.Module, tensors: CheckpointTensors) -> None:
    """Every parameter and saved buffer outside the experts, read by name at its skeleton dtype; tied weights are
    tied. A buffer the checkpoint lacks keeps the value its module computed."""
    skipped = tuple(f"{name}." for name, _ in experts_modules(model))
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    missing = []
    for name, current in [*model.named_parameters(), *_persistent_buffers(model)]:
        if name.startswith(skipped) or name in tied:
            continue
        source = tensors.checkpoint_name(name)
        if source is not None:
            _assign(model, name, tensors.read(source).to(current.dtype))
        elif current.is_meta:
            missing.append(name)
    if missing:
        raise ValueError(f"{tensors.folder}: no tensor for {', '.join(missing[:5])}"
                         f"{' ...' if len(missing) > 5 else ''}")
    model.tie_weights()


def _persistent_buffers(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    for module_name, module in model.named_modules():
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                yield (f"{module_name}.{name}" if module_name else name), buffer


def _assign(model: nn.Module, name: str, value: torch.Tensor) -> None:
    owner_name, _, leaf = name.rpartition(".")
    owner = model.get_submodule(owner_name)
    if leaf in owner._parameters:
        owner._parameters[leaf] = nn.Parameter(value, requires_grad=owner._parameters[leaf].requires_grad)
    else:
        owner._buffers[leaf] = value


def still_on_meta(model: nn.Module) -> list[str]:
    return [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.is_meta]


class ExpertReader:
    """Reads a rank's experts of each MoE block when router swap asks for them (`experts`)."""

    def __init__(self, tensors: CheckpointTensors, blocks: dict[nn.Module, ExpertBlock], dtype: torch.dtype):
        self.tensors, self._blocks, self._dtype = tensors, blocks, dtype  # blocks: by transformers' experts module
        self.experts_read = 0  # (block, expert) pairs

    @property
    def blocks(self) -> int:
        return len(self._blocks)

    def experts(self, experts_module: nn.Module, layer_index: int, first: int, count: int) -> CheckpointExperts:
        block = self._blocks[experts_module]
        self.experts_read += count
        try:
            return read_experts(self.tensors, block, experts_module, layer_index, first, count, self._dtype)
        finally:
            self.tensors.release()


def local_folder(pretrained: str) -> Path | None:
    """The checkpoint's folder: a local one, or a hub name's snapshot (its config and safetensors, from the cache or
    downloaded); None where there is none to read tensor by tensor."""
    if Path(pretrained).is_dir():
        return Path(pretrained)
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(pretrained, allow_patterns=["*.json", "*.safetensors"]))
    except Exception:  # noqa: BLE001 — from_pretrained will load it, or say why it cannot
        return None


def load_without_experts(pretrained: str, dtype: torch.dtype) -> tuple[nn.Module, ExpertReader] | None:
    """transformers' model with every tensor but the experts loaded from the checkpoint at dtype, the experts left
    on the meta device, and the reader of them; None where the checkpoint's experts are not all named as
    expected (from_pretrained loads it whole)."""
    folder = local_folder(pretrained)
    if folder is None or not lazy_loadable(folder):
        return None
    model = skeleton(folder, dtype)
    tensors = CheckpointTensors(folder)
    blocks = {module: expert_block(tensors, name) for name, module in experts_modules(model)}
    if not blocks or not all(blocks.values()):
        return None
    load_dense(model, tensors)
    tensors.release()
    return model, ExpertReader(tensors, blocks, dtype)
