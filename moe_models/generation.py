"""Batched greedy and beam-search decoding for encoder-decoder models (`encode` / `decode` as in Seq2SeqMoE).

Each step feeds one new token per hypothesis against a key/value cache (`start_decoding` / `decode_step`,
models/kv_cache.py), where that gives the tokens re-running the decoder over the prefix would: every MoE layer routes
each token by itself (a causal router) and drops none (no capacity factor). Expert choice and capacity-limited
dispatch decide a token's experts from the whole batch of tokens, so for them each step re-runs the prefix, and the
MoE layers see the forward they see in training.
Beam search follows HF transformers' BeamSearchScorer with early_stopping=True: a sentence is done once it has
`num_beams` finished hypotheses, each scored by sum log p / length ** length_penalty; with one beam it is greedy.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from moe_models.moe_ffn import routing_analytics_off


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int = 48
    num_beams: int = 1  # 1 = greedy
    length_penalty: float = 1.0
    no_repeat_ngram_size: int = 0  # 0 = off


def ban_repeated_ngrams(seqs_NT: torch.Tensor, logp_NV: torch.Tensor, n: int) -> torch.Tensor:
    """-inf for every token that would complete an n-gram already present in its sequence (fairseq/HF rule)."""
    if n <= 0 or seqs_NT.shape[1] < n:
        return logp_NV
    grams = seqs_NT.unfold(1, n, 1)  # (N, T-n+1, n)
    match = (grams[:, :, :-1] == seqs_NT[:, None, -(n - 1):]).all(-1) if n > 1 else torch.ones_like(grams[..., 0],
                                                                                                   dtype=torch.bool)
    rows, cols = match.nonzero(as_tuple=True)
    return logp_NV.index_put((rows, grams[rows, cols, -1]), logp_NV.new_tensor(float("-inf")))


class _Prefix:
    """Re-runs the decoder over each hypothesis's whole prefix at every step."""

    def __init__(self, model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor):
        self.model, self.memory, self.src_valid = model, model.encode(src_BS, src_valid_BS), src_valid_BS

    def next_logits(self, seqs_NT: torch.Tensor) -> torch.Tensor:
        return self.model.decode(self.memory, self.src_valid, seqs_NT)[:, -1]

    def reorder(self, rows_N: torch.Tensor) -> None:
        self.memory, self.src_valid = self.memory[rows_N], self.src_valid[rows_N]


class _Cached:
    """Feeds each step's new token against the cache of everything before it."""

    def __init__(self, model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor):
        self.model, self.state = model, model.start_decoding(src_BS, src_valid_BS)

    def next_logits(self, seqs_NT: torch.Tensor) -> torch.Tensor:
        fed = self.state.caches[0][0].length
        return self.model.decode_step(seqs_NT[:, fed:], self.state)

    def reorder(self, rows_N: torch.Tensor) -> None:
        self.state.reorder(rows_N)


def caches_give_the_same_tokens(model) -> bool:
    """Every MoE layer routes a token by itself and drops none: a cached step routes as the prefix's re-run does."""
    from moe_models.moe_ffn import MoEFeedForward

    layers = [m for m in model.modules() if isinstance(m, MoEFeedForward)]
    return hasattr(model, "start_decoding") and all(
        layer.router.causal and layer.dispatch.spec.capacity_factor is None for layer in layers)


def _decoder(model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor):
    kind = _Cached if caches_give_the_same_tokens(model) else _Prefix
    return kind(model, src_BS, src_valid_BS)


def _next_logp(decoder, seqs: torch.Tensor, settings: GenerationSettings) -> torch.Tensor:
    logits = decoder.next_logits(seqs)
    return ban_repeated_ngrams(seqs, F.log_softmax(logits.float(), dim=-1), settings.no_repeat_ngram_size)


def _until_eos(tokens: list[int], eos: int) -> list[int]:
    return tokens[:tokens.index(eos)] if eos in tokens else tokens


@torch.no_grad()
def greedy(model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor, settings: GenerationSettings,
           eos: int) -> list[list[int]]:
    decoder = _decoder(model, src_BS, src_valid_BS)
    seqs = torch.full((src_BS.shape[0], 1), eos, dtype=torch.long, device=src_BS.device)  # EOS starts the decoder
    done = torch.zeros(src_BS.shape[0], dtype=torch.bool, device=src_BS.device)
    for _ in range(settings.max_new_tokens):
        token = _next_logp(decoder, seqs, settings).argmax(-1).masked_fill(done, eos)
        seqs = torch.cat([seqs, token[:, None]], dim=1)
        done |= token == eos
        if done.all():
            break
    return [_until_eos(row, eos) for row in seqs[:, 1:].tolist()]


@torch.no_grad()
def beam_search(model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor, settings: GenerationSettings,
                eos: int) -> list[list[int]]:
    B, nb = src_BS.shape[0], settings.num_beams
    decoder = _decoder(model, src_BS, src_valid_BS)
    decoder.reorder(torch.arange(B, device=src_BS.device).repeat_interleave(nb))  # each source's nb beams
    seqs = torch.full((B * nb, 1), eos, dtype=torch.long, device=src_BS.device)
    scores = torch.full((B, nb), float("-inf"), device=src_BS.device)
    scores[:, 0] = 0.0  # all beams start identical: expand only the first
    finished: list[list[tuple[float, list[int]]]] = [[] for _ in range(B)]
    done = [False] * B
    for step in range(settings.max_new_tokens):
        logp = _next_logp(decoder, seqs, settings)
        V = logp.shape[-1]
        top_scores, top_idx = (scores.view(-1, 1) + logp).view(B, nb * V).topk(2 * nb, dim=1)
        rows, tokens, new_scores = [], [], torch.full((B, nb), float("-inf"), device=src_BS.device)
        for b, (cand_scores, cand_idx) in enumerate(zip(top_scores.tolist(), top_idx.tolist())):
            kept = 0
            for rank, (score, idx) in enumerate(zip(cand_scores, cand_idx)):
                beam, token = divmod(idx, V)
                if done[b] or kept == nb:
                    break
                if token == eos:  # a hypothesis ends; only the top-nb candidates may end (as in HF)
                    if rank < nb and score > float("-inf"):
                        prefix = seqs[b * nb + beam, 1:].tolist()
                        finished[b].append((score / (step + 1) ** settings.length_penalty, prefix))
                    continue
                rows.append(b * nb + beam)
                tokens.append(token)
                new_scores[b, kept] = score
                kept += 1
            while kept < nb:  # a finished sentence keeps dummy beams so tensors stay (B*nb, ...)
                rows.append(b * nb)
                tokens.append(eos)
                kept += 1
            done[b] = done[b] or len(finished[b]) >= nb
        if all(done):
            break
        survivors = torch.tensor(rows, device=seqs.device)
        seqs = torch.cat([seqs[survivors], torch.tensor(tokens, device=seqs.device)[:, None]], dim=1)
        decoder.reorder(survivors)
        scores = new_scores
    length = seqs.shape[1] - 1
    for b in range(B):  # out of length: the running beams compete with the finished ones
        if not done[b]:
            for k in range(nb):
                if scores[b, k] > float("-inf"):
                    finished[b].append((scores[b, k].item() / length ** settings.length_penalty,
                                        seqs[b * nb + k, 1:].tolist()))
    return [max(hyps, key=lambda h: h[0])[1] for hyps in finished]


def generate(model, src_BS: torch.Tensor, src_valid_BS: torch.Tensor, settings: GenerationSettings,
             eos: int) -> list[list[int]]:
    """Token ids of each summary, without the start and end symbols."""
    search = greedy if settings.num_beams == 1 else beam_search
    with routing_analytics_off(model):
        return search(model, src_BS, src_valid_BS, settings, eos)
