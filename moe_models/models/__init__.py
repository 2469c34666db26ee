"""Model registry: name -> (options schema, constructor). One line per model family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel
from torch import nn

from moe_models.models.gpt import GPT, GPTOptions, LMOutput
from moe_models.registry import Registry


@dataclass(frozen=True)
class ModelFamily:
    Options: type[BaseModel]
    # (options, routing, vocab_size, max_seq_len, seed, num_domains=0, token_counts_V=None) -> model
    build: Callable[..., nn.Module]
    autoregressive: bool = True  # a non-causal router (expert choice) would see future tokens


MODELS: Registry[ModelFamily] = Registry("model")
MODELS.register("gpt")(ModelFamily(GPTOptions, GPT))

__all__ = ["MODELS", "ModelFamily", "GPT", "GPTOptions", "LMOutput"]
