"""Model registry: name -> (options schema, constructor). One line per model family."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

from pydantic import BaseModel
from torch import nn

from moe_models.models.common import LMOutput
from moe_models.models.gpt import GPT, GPTOptions
from moe_models.models.hf import HFCausalLM, HFOptions
from moe_models.models.llama import Llama, LlamaOptions
from moe_models.models.seq2seq import Seq2SeqMoE, Seq2SeqOptions
from moe_models.registry import Registry


@dataclass(frozen=True)
class ModelFamily:
    Options: type[BaseModel]
    # (options, routing, vocab_size, max_seq_len, seed, num_domains=0, token_counts_V=None) -> model
    build: Callable[..., nn.Module]
    autoregressive: bool = True  # a non-causal router (expert choice) would see future tokens
    task: str = "lm"  # the kind of dataset it trains on: lm (token windows) or summarization (pairs)


MODELS: Registry[ModelFamily] = Registry("model")
MODELS.register("gpt")(ModelFamily(GPTOptions, GPT))
MODELS.register("llama")(ModelFamily(LlamaOptions, Llama))
MODELS.register("hf")(ModelFamily(HFOptions, HFCausalLM))
MODELS.register("seq2seq")(ModelFamily(Seq2SeqOptions, Seq2SeqMoE, task="summarization"))

__all__ = ["MODELS", "ModelFamily", "GPT", "GPTOptions", "Llama", "LlamaOptions", "LMOutput", "Seq2SeqMoE", "Seq2SeqOptions"]
