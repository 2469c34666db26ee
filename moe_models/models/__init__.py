"""Model registry, torch-free: name -> the family's options schema (models/options.py), what the validator must know
about it, and where its constructor lives (imported on first use). One line per model family."""
from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel

from moe_models.models.options import GPTOptions, HFOptions, LlamaOptions, Seq2SeqOptions
from moe_models.registry import Registry


@dataclass(frozen=True)
class ModelFamily:
    Options: type[BaseModel]
    constructor: str  # "module:Class"; (options, routing, vocab_size, max_seq_len, seed, num_domains=0,
    #                     token_counts_V=None) -> nn.Module
    autoregressive: bool = True  # a non-causal router (expert choice) would see future tokens
    task: str = "lm"  # the kind of dataset it trains on: lm (token windows) or summarization (pairs)

    @property
    def build(self) -> Callable:
        module, name = self.constructor.split(":")
        return getattr(importlib.import_module(module), name)


MODELS: Registry[ModelFamily] = Registry("model")
MODELS.register("gpt")(ModelFamily(GPTOptions, "moe_models.models.gpt:GPT"))
MODELS.register("llama")(ModelFamily(LlamaOptions, "moe_models.models.llama:Llama"))
MODELS.register("hf")(ModelFamily(HFOptions, "moe_models.models.hf:HFCausalLM"))
MODELS.register("seq2seq")(ModelFamily(Seq2SeqOptions, "moe_models.models.seq2seq:Seq2SeqMoE", task="summarization"))

__all__ = ["MODELS", "ModelFamily"]
