"""Expert parallelism for the grouped backend, on DeepSpeed's expert-parallel machinery.

`StackedMoE` is a `deepspeed.moe.layer.MoE` by type only (its __init__ builds none of DeepSpeed's gate or expert
modules), so the DeepSpeed engine treats it as one of its MoE layers: it creates the expert-parallel process groups
(`set_deepspeed_parallelism`), reduces expert gradients over the expert-data-parallel group only, broadcasts them
within it, and saves/loads per-expert checkpoint shards. Its state dict speaks DeepSpeed's per-expert layout
(`deepspeed_moe.experts.deepspeed_experts.<i>.{up,down}.{weight,bias}`), so module checkpoints move freely between
the two dispatch backends and DeepSpeed's MoE checkpointing finds the keys it expects.

`exchange_and_run` sends expert-sorted routes to the ranks that hold their experts with variable-size all-to-all
(the split sizes are the one host read it needs), runs the local experts, and sends the outputs back.
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.distributed as dist
from deepspeed.moe.layer import MoE
from torch import nn
from torch.distributed.nn.functional import all_to_all_single

from moe_models.dispatch.base import DispatchSpec
from moe_models.dispatch.stacked_experts import StackedExperts

ExpertRun = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]
# StackedExperts parameter -> the ExpertFFN key of one expert in DeepSpeed's layout
_PER_EXPERT_KEYS = {"up_weight_EFD": "up.weight", "up_bias_EF": "up.bias",
                    "down_weight_EDF": "down.weight", "down_bias_ED": "down.bias"}
_DS_EXPERTS = "deepspeed_moe.experts.deepspeed_experts"


class _LocalExperts(nn.Module):
    """Stands where DeepSpeed's MOELayer stands (`deepspeed_moe`): holds this rank's experts and the EP group."""

    def __init__(self, experts: StackedExperts):
        super().__init__()
        self.experts = experts
        self.ep_group: dist.ProcessGroup | None = None

    def _set_ep_group(self, ep_group: dist.ProcessGroup) -> None:  # called by MoE._create_process_groups
        self.ep_group = ep_group


class StackedMoE(MoE):
    def __init__(self, spec: DispatchSpec):
        nn.Module.__init__(self)  # MoE.__init__ would build DeepSpeed's own gate and per-expert modules
        self.ep_size = spec.ep_size
        self.expert_group_name = f"ep_size_{spec.ep_size}"  # DeepSpeed's naming: one group set per ep_size
        self.num_experts = spec.num_experts
        self.num_local_experts = spec.num_experts // spec.ep_size
        self.enable_expert_tensor_parallelism = False
        self.use_residual = False
        self.deepspeed_moe = _LocalExperts(StackedExperts(self.num_local_experts, spec.d_model, spec.expert_hidden,
                                                          spec.activation))
        for param in self.experts.parameters():  # what deepspeed.moe.experts.Experts marks on its experts
            param.allreduce = False
            param.group_name = self.expert_group_name
        self.register_state_dict_post_hook(_split_experts)
        self.register_load_state_dict_pre_hook(_stack_experts)

    @property
    def experts(self) -> StackedExperts:
        return self.deepspeed_moe.experts

    @property
    def ep_group(self) -> dist.ProcessGroup | None:
        return self.deepspeed_moe.ep_group

    def forward(self, *_):  # pragma: no cover - the grouped dispatch drives the experts itself
        raise RuntimeError("StackedMoE is a container; GroupedDispatch runs its experts")


def _split_experts(module: StackedMoE, state_dict: dict, prefix: str, _metadata) -> None:
    for name, key in _PER_EXPERT_KEYS.items():
        if f"{prefix}deepspeed_moe.experts.{name}" not in state_dict:  # SwiGLU experts have no biases
            continue
        stacked = state_dict.pop(f"{prefix}deepspeed_moe.experts.{name}")
        for i, tensor in enumerate(stacked.unbind(0)):
            state_dict[f"{prefix}{_DS_EXPERTS}.{i}.{key}"] = tensor


def _stack_experts(module: StackedMoE, state_dict: dict, prefix: str, *_args) -> None:
    for name, key in _PER_EXPERT_KEYS.items():
        keys = [f"{prefix}{_DS_EXPERTS}.{i}.{key}" for i in range(module.num_local_experts)]
        if all(k in state_dict for k in keys):
            state_dict[f"{prefix}deepspeed_moe.experts.{name}"] = torch.stack([state_dict.pop(k) for k in keys])


def exchange_and_run(x_RD: torch.Tensor, counts_E: torch.Tensor, moe: StackedMoE, run: ExpertRun) -> torch.Tensor:
    """Routes sorted by (global) expert -> their expert outputs, the experts living on the EP group's ranks
    (rank r holds experts [r*n, (r+1)*n), DeepSpeed's placement)."""
    P, n = moe.ep_size, moe.num_local_experts
    send_PN = counts_E.view(P, n)
    recv_PN = torch.empty_like(send_PN)
    dist.all_to_all_single(recv_PN, send_PN, group=moe.ep_group)  # from each rank, its routes per local expert
    send_splits, recv_splits = send_PN.sum(1).tolist(), recv_PN.sum(1).tolist()  # the host read all-to-all needs
    x_in = all_to_all_single(x_RD.new_empty(sum(recv_splits), x_RD.shape[1]), x_RD, recv_splits, send_splits,
                             group=moe.ep_group)
    # Received rows come grouped by source rank, then local expert: regroup by local expert for the GEMMs.
    local_expert = torch.arange(n, device=x_RD.device).repeat(P).repeat_interleave(recv_PN.reshape(-1))
    order = torch.argsort(local_expert, stable=True)
    inverse = torch.empty_like(order).scatter_(0, order, torch.arange(len(order), device=order.device))
    y_in = run(x_in.index_select(0, order), local_expert.index_select(0, order), recv_PN.sum(0)).index_select(
        0, inverse)
    return all_to_all_single(x_RD.new_empty(x_RD.shape), y_in, send_splits, recv_splits, group=moe.ep_group)
