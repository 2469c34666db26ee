"""Encoder-decoder transformer (Vaswani et al. 2017, pre-LN) whose FFNs are MoE every `moe_every` blocks, in the
encoder and in the decoder, on the same router / balancing / dispatch stack as the GPT family.

Block indices: encoder blocks are 0..encoder_layers-1 and decoder blocks follow, so every MoE layer has its own router
seed and its own metric prefix (`block{i}`). Decoder MoE layers route by the decoder's input token ids (the token
being processed), which is what hash routing needs. Shapes: B batch, S source length, L target length, D model dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moe_models.models.common import LMOutput, build_ffn, init_parameters
from moe_models.models.kv_cache import LayerCache
from moe_models.models.options import Seq2SeqOptions
from moe_models.moe_ffn import share_recorder
from moe_models.spec import RoutingSpec

IGNORE_INDEX = -100


@dataclass
class Seq2SeqDecoding:
    """What decoding keeps between tokens: the encoded source, and per decoder block its self-attention cache and
    its cross-attention keys and values of the memory."""
    memory: torch.Tensor
    memory_valid: torch.Tensor
    caches: list[tuple[LayerCache, LayerCache]]

    def reorder(self, rows_N: torch.Tensor) -> None:
        """Keep batch rows `rows_N`, in that order: beams of a source (rows repeated), survivors of a step."""
        self.memory, self.memory_valid = self.memory[rows_N], self.memory_valid[rows_N]
        for self_cache, cross_cache in self.caches:
            self_cache.reorder(rows_N)
            cross_cache.reorder(rows_N)


def sinusoidal_positions(length: int, d_model: int) -> torch.Tensor:
    """(length, D) fixed encodings, Vaswani et al. 2017 section 3.5."""
    position = torch.arange(length, dtype=torch.float32).unsqueeze(1)
    freq = torch.exp(torch.arange(0, d_model, 2, dtype=torch.float32) * (-math.log(10_000.0) / d_model))
    table = torch.zeros(length, d_model)
    table[:, 0::2] = torch.sin(position * freq)
    table[:, 1::2] = torch.cos(position * freq[: d_model // 2])
    return table


class Attention(nn.Module):
    """Multi-head attention of queries over a memory (itself for self-attention)."""

    def __init__(self, d_model: int, n_heads: int, dropout: float):
        super().__init__()
        self.n_heads, self.dropout = n_heads, dropout
        self.q, self.kv = nn.Linear(d_model, d_model), nn.Linear(d_model, 2 * d_model)
        self.out = nn.Linear(d_model, d_model)

    def forward(self, x_BQD: torch.Tensor, memory_BKD: torch.Tensor, keys_valid_BK: torch.Tensor | None,
                causal: bool = False, cache: LayerCache | None = None) -> torch.Tensor:
        """cache (decoding, kv_cache.py): self-attention extends it with this step's keys and values; cross-attention
        (not causal) computes the memory's once and reads them from it afterwards."""
        B, Q, D = x_BQD.shape
        h = self.n_heads
        q = self.q(x_BQD).view(B, Q, h, D // h).transpose(1, 2)
        if cache is not None and not causal and cache.length:
            k, v = cache.k, cache.v
        else:
            k, v = (t.transpose(1, 2) for t in self.kv(memory_BKD).view(B, -1, 2, h, D // h).unbind(dim=2))
            if cache is not None:
                k, v, first = cache.extend(k, v)
                causal = causal and first
        mask = None if keys_valid_BK is None else keys_valid_BK[:, None, None, :]  # True = may attend
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.out(y.transpose(1, 2).reshape(B, Q, D))


class EncoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.attn = Attention(d_model, n_heads, dropout)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)  # on each sub-layer's output (Vaswani et al. 2017, 5.4)

    def forward(self, x: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
        h = self.ln1(x)
        x = x + self.drop(self.attn(h, h, valid))
        return x + self.drop(self.ffn(self.ln2(x)))


class DecoderBlock(nn.Module):
    def __init__(self, d_model: int, n_heads: int, dropout: float, ffn: nn.Module):
        super().__init__()
        self.ln1, self.ln2, self.ln3 = nn.LayerNorm(d_model), nn.LayerNorm(d_model), nn.LayerNorm(d_model)
        self.self_attn = Attention(d_model, n_heads, dropout)
        self.cross_attn = Attention(d_model, n_heads, dropout)
        self.ffn = ffn
        self.drop = nn.Dropout(dropout)  # on each sub-layer's output (Vaswani et al. 2017, 5.4)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, memory_valid: torch.Tensor,
                caches: tuple[LayerCache, LayerCache] | None = None) -> torch.Tensor:
        self_cache, cross_cache = caches or (None, None)
        h = self.ln1(x)
        x = x + self.drop(self.self_attn(h, h, None, causal=True, cache=self_cache))  # right padding: never seen
        x = x + self.drop(self.cross_attn(self.ln2(x), memory, memory_valid, cache=cross_cache))
        return x + self.drop(self.ffn(self.ln3(x)))


class Seq2SeqMoE(nn.Module):
    def __init__(self, opts: Seq2SeqOptions, routing: RoutingSpec, vocab_size: int, max_seq_len: int, seed: int,
                 num_domains: int = 0, token_counts_V: torch.Tensor | None = None):
        super().__init__()
        self.opts = opts
        d, h, p = opts.d_model, opts.n_heads, opts.dropout

        def ffn(stack_index: int, layer_index: int) -> nn.Module:
            return build_ffn(opts, stack_index, layer_index, routing, vocab_size, seed, num_domains, token_counts_V)

        self.enc_emb = nn.Embedding(vocab_size, d)
        self.dec_emb = self.enc_emb if opts.shared_embeddings else nn.Embedding(vocab_size, d)
        if opts.positions == "learned":
            self.pos_emb = nn.Embedding(max_seq_len, d)
        else:
            self.register_buffer("pos_table", sinusoidal_positions(max_seq_len, d), persistent=False)
        self.encoder = nn.ModuleList(EncoderBlock(d, h, p, ffn(i, i)) for i in range(opts.encoder_layers))
        self.decoder = nn.ModuleList(DecoderBlock(d, h, p, ffn(i, opts.encoder_layers + i))
                                     for i in range(opts.decoder_layers))
        self.ln_enc, self.ln_dec = nn.LayerNorm(d), nn.LayerNorm(d)
        self.drop = nn.Dropout(p)
        self.lm_head = nn.Linear(d, vocab_size, bias=False)
        # Sinusoidal positions have unit amplitude: token embeddings N(0, 1/d) scaled by sqrt(d) match it (Vaswani et
        # al. 3.4, fairseq); with 0.02 they would drown under the positions. Learned positions: GPT-2's 0.02, no scale.
        sinusoidal = opts.positions == "sinusoidal"
        self.embed_scale = math.sqrt(d) if sinusoidal else 1.0
        init_parameters(self, seed, opts.ep_size, {"enc_emb": d ** -0.5, "dec_emb": d ** -0.5} if sinusoidal else None)
        self.lm_head.weight = self.dec_emb.weight  # tied after init: one tensor, drawn once
        self.moe_recorder = share_recorder(self)

    def _embed(self, emb: nn.Embedding, ids_BS: torch.Tensor, start: int = 0) -> torch.Tensor:
        end = start + ids_BS.shape[1]
        x = emb(ids_BS) * self.embed_scale
        # The sinusoid table is a buffer, and DeepSpeed's bf16/fp16 engines keep buffers fp32: cast it, or it would
        # promote the whole residual stream to fp32 (and LayerNorm refuses fp32 input with bf16 weights).
        pos = self.pos_emb.weight[start:end] if self.opts.positions == "learned" else self.pos_table[start:end].to(
            x.dtype)
        return self.drop(x + pos)

    def encode(self, src_BS: torch.Tensor, src_valid_BS: torch.Tensor) -> torch.Tensor:
        """The encoder's memory (B, S, D). Its MoE layers record in `moe_recorder` (a forward pass reads them)."""
        self.moe_recorder.feed(src_BS, None, src_valid_BS)
        x = self._embed(self.enc_emb, src_BS)
        for block in self.encoder:
            x = block(x, src_valid_BS)
        return self.ln_enc(x)

    def decode(self, memory_BSD: torch.Tensor, src_valid_BS: torch.Tensor, decoder_in_BL: torch.Tensor,
               decoder_valid_BL: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, L, V) for every decoder position."""
        self.moe_recorder.feed(decoder_in_BL, None, decoder_valid_BL)
        x = self._embed(self.dec_emb, decoder_in_BL)
        for block in self.decoder:
            x = block(x, memory_BSD, src_valid_BS)
        return self.lm_head(self.ln_dec(x))

    def start_decoding(self, src_BS: torch.Tensor, src_valid_BS: torch.Tensor) -> Seq2SeqDecoding:
        """Encode the source once; decode_step then generates against it (kv_cache.py)."""
        self.moe_recorder.reset()
        memory = self.encode(src_BS, src_valid_BS)
        self.moe_recorder.take()
        return Seq2SeqDecoding(memory, src_valid_BS, [(LayerCache(), LayerCache()) for _ in self.decoder])

    def decode_step(self, decoder_in_BL: torch.Tensor, state: Seq2SeqDecoding) -> torch.Tensor:
        """The next-token logits (B, V) after these decoder tokens, which follow the cached ones."""
        start = state.caches[0][0].length
        self.moe_recorder.reset()
        self.moe_recorder.feed(decoder_in_BL, None, None)  # hash routing reads the decoder's token ids
        x = self._embed(self.dec_emb, decoder_in_BL, start)
        for block, caches in zip(self.decoder, state.caches):
            x = block(x, state.memory, state.memory_valid, caches)
        self.moe_recorder.take()
        return self.lm_head(self.ln_dec(x[:, -1]))

    def forward(self, src_BS: torch.Tensor, src_valid_BS: torch.Tensor, decoder_in_BL: torch.Tensor,
                labels_BL: torch.Tensor) -> LMOutput:
        """Teacher-forced loss over real target tokens (IGNORE_INDEX labels are padding)."""
        valid_BL = labels_BL != IGNORE_INDEX
        self.moe_recorder.reset()  # encode and decode feed it their own token inputs
        memory = self.encode(src_BS, src_valid_BS)
        logits_BLV = self.decode(memory, src_valid_BS, decoder_in_BL, valid_BL)
        aux = self.moe_recorder.take()
        logits, labels = logits_BLV.flatten(0, 1).float(), labels_BL.flatten()
        smoothing = self.opts.label_smoothing if self.training else 0.0  # evaluation reports the plain NLL
        lm_loss = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, label_smoothing=smoothing)
        token_nll = sequence_nll = None
        if not self.training:  # input difficulty, an evaluation product: in training a second V-wide cross-entropy
            # and, through the mask, a host read
            nll_BL = F.cross_entropy(logits.detach(), labels, ignore_index=IGNORE_INDEX,
                                     reduction="none").view_as(labels_BL)  # 0 at padding
            token_nll = nll_BL[valid_BL]
            sequence_nll = nll_BL.sum(-1) / valid_BL.sum(-1).clamp(min=1)  # a pair's mean over its summary tokens
        aux_loss = sum((a.loss for a in aux.values()), lm_loss.new_zeros(()))
        decoder_blocks = tuple(i for i in aux if i >= self.opts.encoder_layers)  # layer index: encoder ones first
        return LMOutput(lm_loss, aux_loss, aux, token_nll, target_blocks=decoder_blocks, sequence_nll_B=sequence_nll)
