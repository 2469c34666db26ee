"""LoRA (Hu et al. 2022) through PEFT: low-rank adapters on the named linears of a model, everything else frozen but
the MoE routers, which a swapped-in or upcycled router needs to learn (and, by choice, the experts). PEFT's
`inject_adapter_in_model` works on any module, so the same call serves a wrapped checkpoint and our own models."""
from __future__ import annotations

from typing import TYPE_CHECKING, NamedTuple

from pydantic import Field, PositiveFloat, PositiveInt, confloat

from moe_models.options import StrictOptions

if TYPE_CHECKING:  # the options are read when a study is validated, which imports no torch
    from torch import nn


class LoRAOptions(StrictOptions):
    r: PositiveInt = 8
    alpha: PositiveFloat = 16.0
    dropout: confloat(ge=0, lt=1) = 0.0
    # Leaf module names (transformers' names: q_proj, v_proj for Llama-likes, c_attn for GPT-2).
    target_modules: list[str] = Field(default_factory=lambda: ["q_proj", "v_proj"], min_length=1)
    train_experts: bool = False  # routed and shared experts fully trainable too


def apply_lora(model: nn.Module, opts: LoRAOptions) -> nn.Module:
    """Inject the adapters in place and set what trains; returns the model."""
    from peft import LoraConfig, inject_adapter_in_model

    from moe_models.moe_ffn import MoEFeedForward

    config = LoraConfig(r=opts.r, lora_alpha=opts.alpha, lora_dropout=opts.dropout,
                        target_modules=list(opts.target_modules), bias="none")
    inject_adapter_in_model(config, model)
    for name, param in model.named_parameters():
        param.requires_grad = "lora_" in name
    for layer in model.modules():
        if isinstance(layer, MoEFeedForward):
            trainable = [layer.router] + ([layer.shared_expert_gate] if layer.shared_expert_gate is not None else [])
            if opts.train_experts:
                trainable += [layer.dispatch] + ([layer.shared_experts] if layer.shared_experts is not None else [])
            for module in trainable:
                for param in module.parameters():
                    param.requires_grad = True
    return model


class ParameterCounts(NamedTuple):
    total: int
    trainable: int


def parameter_counts(model: nn.Module) -> ParameterCounts:
    """Total and trainable parameters (a tied weight counts once)."""
    unique = {id(p): p for p in model.parameters()}.values()
    return ParameterCounts(sum(p.numel() for p in unique), sum(p.numel() for p in unique if p.requires_grad))
