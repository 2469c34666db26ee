"""GPT-style decoder LM (nanoGPT layout) whose FFN is an MoE block every `moe_every` blocks.

Block.forward is two residual lines; the FFN slot holds either a dense ExpertFFN or a MoEFeedForward.
Shapes: B batch, S sequence, D model dim, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.models.common import LMOutput, build_ffn, init_parameters, next_token_output
from moe_models.models.kv_cache import LayerCache
from moe_models.models.options import GPTOptions
from moe_models.moe_ffn import share_recorder
from moe_models.spec import RoutingSpec


class CausalSelfAttention(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.qkv = nn.Linear(d_model, 3 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BSD: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        B, S, D = x_BSD.shape
        q, k, v = (t.transpose(1, 2) for t in self.qkv(x_BSD).view(B, S, 3, self.n_heads, D // self.n_heads).unbind(2))
        causal = True
        if cache is not None:  # decoding: attend to the cached positions too (kv_cache.py)
            k, v, causal = cache.extend(k, v)
        y = F.scaled_dot_product_attention(  # (B, nh, S, hs)
            q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, S, D))


class Block(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = CausalSelfAttention(d_model, n_heads, dropout)
        self.ffn = ffn

    def forward(self, x: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.attn(self.ln1(x), cache)
        return x + self.ffn(self.ln2(x))


class GPT(nn.Module):
    def __init__(self, opts: GPTOptions, routing: RoutingSpec, vocab_size: int, max_seq_len: int, seed: int,
                 num_domains: int = 0, token_counts_V: torch.Tensor | None = None):
        super().__init__()
        self.opts = opts
        self.tok_emb = nn.Embedding(vocab_size, opts.d_model)
        self.pos_emb = nn.Embedding(max_seq_len, opts.d_model)
        self.blocks = nn.ModuleList(
            Block(opts.d_model, opts.n_heads, opts.dropout,
                  build_ffn(opts, i, i, routing, vocab_size, seed, num_domains, token_counts_V))
            for i in range(opts.n_layers)
        )
        self.ln_f = nn.LayerNorm(opts.d_model)
        self.lm_head = nn.Linear(opts.d_model, vocab_size, bias=False)
        self.lm_head.weight = self.tok_emb.weight  # weight tying (nanoGPT)
        init_parameters(self, seed, opts.ep_size)
        self.moe_recorder = share_recorder(self)

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor,
                domain_ids_BS: torch.Tensor | None = None) -> LMOutput:
        """domain_ids_BS (optional): each token's document domain, for domain analytics and the reference router."""
        positions = torch.arange(input_ids_BS.shape[1], device=input_ids_BS.device)
        x = self.tok_emb(input_ids_BS) + self.pos_emb(positions)
        self.moe_recorder.begin(input_ids_BS, domain_ids_BS)
        for block in self.blocks:
            x = block(x)
        logits_BSV = self.lm_head(self.ln_f(x))
        return next_token_output(logits_BSV, targets_BS, self.moe_recorder.take())

    def new_decoding_state(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def decode_step(self, input_ids_BS: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """The next-token logits (B, V) after these tokens, which follow the cached ones (kv_cache.py)."""
        start = caches[0].length
        positions = torch.arange(start, start + input_ids_BS.shape[1], device=input_ids_BS.device)
        x = self.tok_emb(input_ids_BS) + self.pos_emb(positions)
        self.moe_recorder.begin(input_ids_BS)  # hash routing reads the token ids
        for block, cache in zip(self.blocks, caches):
            x = block(x, cache)
        self.moe_recorder.take()
        return self.lm_head(self.ln_f(x[:, -1]))
