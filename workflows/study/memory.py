"""A rank's memory for a pretrained (`hf`) model, estimated before anything launches: the parameters come from the
checkpoint's config.json (its modules built on the meta device: no weights read), the bytes from the study's
precision, ZeRO stage, worker count and expert parallelism. Activations are not estimated: they depend on the batch,
the sequence length and checkpointing, and the model state is what a checkpoint of tens of GB makes too large."""
from __future__ import annotations

import functools
import json
import re
from dataclasses import dataclass

from moe_models.pretrained.architecture import Architecture

GiB = 2**30
# bytes per parameter of the weights and gradients DeepSpeed keeps in the training precision
WEIGHT_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
# Adam's optimizer state per trained parameter: fp32 master weights + momentum + variance under mixed precision
# (K = 12 in ZeRO, Rajbhandari et al. 2020, section 3.1); momentum + variance alone in fp32.
OPTIMIZER_BYTES = {"fp32": 8, "bf16": 12, "fp16": 12}
_EXPERT = re.compile(r"\.experts\.")  # routed experts; shared_expert(s) and routers are not
_BLOCK_MLP = re.compile(r"\.(?:layers|h)\.(\d+)\.mlp\.")  # a decoder block's MLP (llama/qwen/mistral, gpt2)


@dataclass(frozen=True)
class ParamCount:
    dense: int  # every parameter but the routed experts': embeddings, attention, norms, shared experts, routers
    experts: int  # the routed experts' over every MoE layer (split across expert-parallel ranks)
    moe_layers: int = 1  # layers holding routed experts (one is built at a time while loading)
    reads_own_experts: bool = False  # a rank reads only its experts (router swap); an upcycled checkpoint is read whole

    @property
    def total(self) -> int:
        return self.dense + self.experts


@dataclass(frozen=True)
class RankMemory:
    weights: int  # bytes on one rank in the steady state
    gradients: int
    optimizer: int
    load_peak: int  # while the checkpoint loads

    @property
    def steady(self) -> int:
        return self.weights + self.gradients + self.optimizer

    def describe(self) -> str:
        return (f"about {_size(self.steady)} per rank for the model's state (weights {_size(self.weights)} + "
                f"gradients {_size(self.gradients)} + optimizer {_size(self.optimizer)}; activations not counted), "
                f"{_size(self.load_peak)} while the checkpoint loads")


def _size(n: float) -> str:
    for unit, scale in (("GiB", GiB), ("MiB", 2**20)):
        if n >= scale:
            return f"{n / scale:.1f} {unit}"
    return f"{n / 2**10:.1f} KiB"


def checkpoint_parameters(config: dict, upcycle=None) -> ParamCount:
    """The parameters of the model a cell trains on this checkpoint: the checkpoint's own, or, upcycled, the dense
    MLP of each block `upcycle` makes MoE turned into `upcycle.num_experts` experts (a granularity of g slices each
    expert, so the experts together hold num_experts / g copies of the MLP)."""
    counts = _named_parameter_counts(config)
    experts = sum(n for name, n in counts.items() if _EXPERT.search(name))
    dense = sum(counts.values()) - experts
    if upcycle is None:
        layers = {block.group(1) for name in counts if _EXPERT.search(name) and (block := _BLOCK_MLP.search(name))}
        return ParamCount(dense, experts, max(1, len(layers)), reads_own_experts=experts > 0)
    mlp = {}
    for name, n in counts.items():
        if (block := _BLOCK_MLP.search(name)) is not None:
            mlp[int(block.group(1))] = mlp.get(int(block.group(1)), 0) + n
    blocks = [block for block in mlp if upcycle.is_moe_layer(block)]
    upcycled = sum(mlp[block] for block in blocks)
    # each upcycled block gains a router; a linear one's d_model x num_experts (other routers differ by a little)
    routers = len(blocks) * Architecture.from_config(config).hidden_size * upcycle.num_experts
    return ParamCount(dense - upcycled + routers, experts + upcycled * upcycle.num_experts // upcycle.granularity)


def rank_memory(params: ParamCount, precision: str, zero_stage: int, workers: int, ep_size: int,
                train_dense: bool = True, train_experts: bool = True) -> RankMemory:
    """Bytes per rank. Non-expert parameters are data-parallel over every worker; each expert lives on one rank of
    its expert-parallel group and is data-parallel over workers / ep_size. ZeRO-1 partitions the optimizer state over
    the data-parallel ranks, ZeRO-2 the gradients too. Frozen parameters (LoRA leaves the checkpoint's weights
    frozen, its experts too unless `train_experts`) hold neither; the adapters' own are small and not counted."""
    weight = WEIGHT_BYTES[precision]
    local_experts = params.experts / ep_size
    dense = params.dense if train_dense else 0
    experts = local_experts if train_experts else 0
    weights = (params.dense + local_experts) * weight

    def per_rank(bytes_per_param: int, partitioned: bool) -> float:
        if not partitioned:
            return bytes_per_param * (dense + experts)
        return bytes_per_param * (dense / workers + experts / max(1, workers // ep_size))

    gradients = per_rank(weight, zero_stage >= 2)
    optimizer = per_rank(OPTIMIZER_BYTES[precision], zero_stage >= 1)
    return RankMemory(int(weights), int(gradients), int(optimizer), load_peak=int(_load_peak(params, weight, ep_size)))


def _load_peak(params: ParamCount, weight: int, ep_size: int) -> float:
    """Bytes a rank holds while the checkpoint loads. Router swap: the rank's experts only
    (moe_models/pretrained/expert_sharded_load.py), plus one layer's of them built in fp32 before the cast to the
    training precision; otherwise the whole checkpoint (transformers' from_pretrained)."""
    if not params.reads_own_experts:
        return params.total * weight
    local_experts = params.experts / ep_size
    return (params.dense + local_experts) * weight + local_experts / params.moe_layers * 4


def _named_parameter_counts(config: dict) -> dict[str, int]:
    """name -> element count of every parameter of the checkpoint's model, built on the meta device (once per
    config: validation's printed estimate and its warning ask for the same model)."""
    return dict(_counts_of(json.dumps(config, sort_keys=True)))


@functools.lru_cache(maxsize=16)
def _counts_of(config_json: str) -> tuple[tuple[str, int], ...]:
    from workflows.study.pretrained_sources import meta_model

    return tuple((name, p.numel()) for name, p in meta_model(json.loads(config_json)).named_parameters())
