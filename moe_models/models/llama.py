"""Llama-style decoder LM (Touvron et al. 2023): pre-norm RMSNorm, rotary position embeddings (Su et al. 2021),
SwiGLU FFNs, no biases, optional grouped-query attention and tied embeddings; the FFN is an MoE block every
`moe_every` blocks, as in Mixtral, Qwen-MoE and OLMoE.

Module names follow transformers' LlamaDecoderLayer (input_layernorm, self_attn.{q,k,v,o}_proj,
post_attention_layernorm, mlp), so a checkpoint's attention and norms map one to one. Shapes: B batch, S sequence,
D model dim, H heads, G key/value heads, V vocab.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.models.common import LMOutput, build_ffn, init_parameters, next_token_output
from moe_models.models.kv_cache import LayerCache
from moe_models.models.options import LlamaOptions
from moe_models.moe_ffn import share_recorder
from moe_models.spec import RoutingSpec


def rotary_tables(seq_len: int, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(S, head_dim) cos and sin, frequencies repeated over both halves (transformers' rotate_half convention)."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    angles = torch.outer(torch.arange(seq_len, dtype=torch.float32), inv_freq)
    angles = torch.cat([angles, angles], dim=-1)
    return angles.cos(), angles.sin()


def rotate(x_BHSd: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor) -> torch.Tensor:
    first, second = x_BHSd.chunk(2, dim=-1)
    return x_BHSd * cos_Sd + torch.cat([-second, first], dim=-1) * sin_Sd


class Attention(nn.Module):
    def __init__(self, opts: LlamaOptions):
        super().__init__()
        self.n_heads, self.kv_heads = opts.n_heads, opts.kv_heads  # n_heads: cost.py counts attention layers by it
        self.head_dim, self.dropout = opts.d_model // opts.n_heads, opts.dropout
        self.q_proj = nn.Linear(opts.d_model, self.n_heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(opts.d_model, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(opts.d_model, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, opts.d_model, bias=False)

    def forward(self, x_BSD: torch.Tensor, cos_Sd: torch.Tensor, sin_Sd: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        B, S, _ = x_BSD.shape
        q = self.q_proj(x_BSD).view(B, S, self.n_heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x_BSD).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x_BSD).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        cos_Sd, sin_Sd = cos_Sd.to(q.dtype), sin_Sd.to(q.dtype)  # fp32 tables; DeepSpeed casts parameters only
        q, k = rotate(q, cos_Sd, sin_Sd), rotate(k, cos_Sd, sin_Sd)
        causal = True
        if cache is not None:  # decoding: attend to the cached positions too (kv_cache.py)
            k, v, causal = cache.extend(k, v)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=causal, dropout_p=self.dropout if self.training else 0.0,
                                           enable_gqa=self.kv_heads != self.n_heads)
        return self.o_proj(y.transpose(1, 2).reshape(B, S, -1))


class Block(nn.Module):
    def __init__(self, opts: LlamaOptions, ffn: nn.Module):
        super().__init__()
        self.input_layernorm = nn.RMSNorm(opts.d_model, eps=opts.rms_norm_eps)
        self.self_attn = Attention(opts)
        self.post_attention_layernorm = nn.RMSNorm(opts.d_model, eps=opts.rms_norm_eps)
        self.mlp = ffn

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: LayerCache | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Llama(nn.Module):
    def __init__(self, opts: LlamaOptions, routing: RoutingSpec, vocab_size: int, max_seq_len: int, seed: int,
                 num_domains: int = 0, token_counts_V: torch.Tensor | None = None):
        super().__init__()
        self.opts = opts
        self.embed_tokens = nn.Embedding(vocab_size, opts.d_model)
        self.blocks = nn.ModuleList(
            Block(opts, build_ffn(opts, i, i, routing, vocab_size, seed, num_domains, token_counts_V))
            for i in range(opts.n_layers))
        self.norm = nn.RMSNorm(opts.d_model, eps=opts.rms_norm_eps)
        self.lm_head = nn.Linear(opts.d_model, vocab_size, bias=False)
        if opts.tie_embeddings:
            self.lm_head.weight = self.embed_tokens.weight
        cos, sin = rotary_tables(max_seq_len, opts.d_model // opts.n_heads, opts.rope_theta)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        init_parameters(self, seed, opts.ep_size)
        self.moe_recorder = share_recorder(self)

    def forward(self, input_ids_BS: torch.Tensor, targets_BS: torch.Tensor,
                domain_ids_BS: torch.Tensor | None = None) -> LMOutput:
        """domain_ids_BS (optional): each token's document domain, for domain analytics and the reference router."""
        S = input_ids_BS.shape[1]
        cos, sin = self.rope_cos[:S], self.rope_sin[:S]
        x = self.embed_tokens(input_ids_BS)
        self.moe_recorder.begin(input_ids_BS, domain_ids_BS)
        for block in self.blocks:
            x = block(x, cos, sin)
        logits_BSV = self.lm_head(self.norm(x))
        return next_token_output(logits_BSV, targets_BS, self.moe_recorder.take())

    def new_decoding_state(self) -> list[LayerCache]:
        return [LayerCache() for _ in self.blocks]

    def decode_step(self, input_ids_BS: torch.Tensor, caches: list[LayerCache]) -> torch.Tensor:
        """The next-token logits (B, V) after these tokens, which follow the cached ones (kv_cache.py)."""
        start = caches[0].length
        end = start + input_ids_BS.shape[1]
        cos, sin = self.rope_cos[start:end], self.rope_sin[start:end]
        x = self.embed_tokens(input_ids_BS)
        self.moe_recorder.begin(input_ids_BS)  # hash routing reads the token ids
        for block, cache in zip(self.blocks, caches):
            x = block(x, cos, sin, cache)
        self.moe_recorder.take()
        return self.lm_head(self.norm(x[:, -1]))
