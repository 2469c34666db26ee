"""Greedy decoding with a key/value cache for moelab's decoder families (gpt, llama): the cost of a generated token,
which the dynamic-routing and router-architecture reports compare routers on, measured as a model serves it (one
new token's forward against the cached keys and values of everything before it), not by re-running the prefix.

A family that decodes has `decode_step(ids_BS, state) -> logits_BV` (the next-token logits after the last position)
and a state to start from: `new_decoding_state()` for decoder LMs (gpt and llama keep a LayerCache per block, `hf`
models transformers' own DynamicCache), `start_decoding(src, src_valid)` for the encoder-decoder (the encoded source,
and per decoder block a self-attention cache and the memory's cross-attention keys and values).
Shapes: B batch, H heads, S new positions, T cached positions, d head dim.
"""
from __future__ import annotations

import time

import torch
from torch import nn

from moe_models.moe_ffn import routing_analytics_off

# How decoding latency is measured, in cells and in `moelab routers`: a prompt this long, then this many new tokens.
PROMPT_TOKENS, NEW_TOKENS = 16, 32


class LayerCache:
    """One attention layer's keys and values so far, (B, H, T, d) each."""

    def __init__(self):
        self.k: torch.Tensor | None = None
        self.v: torch.Tensor | None = None

    @property
    def length(self) -> int:
        return 0 if self.k is None else self.k.shape[2]

    def extend(self, k_BHSd: torch.Tensor, v_BHSd: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, bool]:
        """(every key, every value, causal?): a prefill (nothing cached) attends causally; one new token attends to
        all that came before it, so it needs no mask. Several new tokens after a prefill would need a mask that
        neither case gives: refused."""
        past = self.length
        if past and k_BHSd.shape[2] != 1:
            raise ValueError(f"{k_BHSd.shape[2]} new positions after {past} cached ones: decode one token at a time")
        self.k = k_BHSd if self.k is None else torch.cat([self.k, k_BHSd], dim=2)
        self.v = v_BHSd if self.v is None else torch.cat([self.v, v_BHSd], dim=2)
        return self.k, self.v, past == 0

    def reorder(self, rows_N: torch.Tensor) -> None:
        """Keep batch rows `rows_N`, in that order (beam search's surviving hypotheses)."""
        if self.k is not None:
            self.k, self.v = self.k[rows_N], self.v[rows_N]


def can_decode(model: nn.Module) -> bool:
    return hasattr(model, "decode_step")


@torch.no_grad()
def greedy_decode(model: nn.Module, prompt_BS: torch.Tensor, new_tokens: int, state=None) -> torch.Tensor:
    """The prompt followed by `new_tokens` greedy tokens, (B, S + new_tokens): one prefill, then one cached forward
    per token. Routing analytics are off: nothing reads them while decoding. state: where decoding starts (a
    seq2seq model's encoded source, `start_decoding`); by default the model's empty cache."""
    state = model.new_decoding_state() if state is None else state
    tokens = prompt_BS
    with routing_analytics_off(model):
        logits_BV = model.decode_step(prompt_BS, state)
        for i in range(new_tokens):
            next_B1 = logits_BV.argmax(dim=-1, keepdim=True)
            tokens = torch.cat([tokens, next_B1], dim=1)
            if i < new_tokens - 1:  # the last token's own logits would go unread
                logits_BV = model.decode_step(next_B1, state)
    return tokens


def synchronize(device: torch.device) -> None:
    """Wait for the accelerator, so that a host clock times its work."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def decode_ms_per_token(model: nn.Module, prompt_BS: torch.Tensor, start, new: int, device: torch.device,
                        repeats: int = 3) -> float:
    """Milliseconds per generated token: greedy decoding of `new` and of 1 token from the same start (`start()`
    makes a fresh decoding state), the difference over new - 1 (the cached forwards between them), so that the
    prefill (or the encoding) cancels; each the best of `repeats` after one warm-up (as timeit: a burst of load
    elsewhere on the machine lengthens a run, never shortens it, and a median of a loaded machine's runs could put
    the one-token decode above the long one)."""

    def seconds(n: int) -> float:
        synchronize(device)
        began = time.perf_counter()
        greedy_decode(model, prompt_BS, n, start())
        synchronize(device)
        return time.perf_counter() - began

    seconds(new)  # warm-up: kernels, allocator, the cache's growth
    many = min(seconds(new) for _ in range(repeats))
    one = min(seconds(1) for _ in range(repeats))
    return max(many - one, 0.0) / (new - 1) * 1e3
