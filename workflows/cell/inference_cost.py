"""What a trained cell costs at inference, measured once at its end on one evaluation micro-batch (the same for
every cell of a study):
- `eval/inference/prefill_tokens_per_s`: tokens of the batch's first input (an LM's windows, a seq2seq model's
  source documents) per second of a no-grad forward, routing analytics off; the median of 5 after 2 warm-ups;
- `eval/inference/peak_mb`: the worker's peak memory during those forwards alone: the accelerator's peak counter,
  or on CPU the process's resident high-water mark (Linux VmHWM), each reset just before, so that training's peak
  cannot hide it. On CPU it includes what is resident then: the weights, and the optimizer state beside them.
- `eval/inference/ms_per_token`: greedy decoding at batch 1 with a key/value cache (moe_models/models/kv_cache.py),
  each new token one cached forward: a decoder LM (gpt, llama, hf) after a prompt of the batch's first window, an
  encoder-decoder from its start token against the first source; (time of n tokens - time of 1) / (n - 1), so the
  prompt's prefill (the source's encoding) is not counted, medians of 3. (The summaries a summarization cell scores
  are decoded by moe_models/generation.py: beam search, no cache.)
Every rank runs the forwards (expert parallelism holds collectives in them); rank 0's figures are logged."""
from __future__ import annotations

import statistics
import time

import torch

from moe_data.prepare import PreparedData
from moe_data.prepared_pairs import PreparedPairs
from moe_models.models.kv_cache import NEW_TOKENS, PROMPT_TOKENS, can_decode, decode_ms_per_token, synchronize
from moe_models.moe_ffn import MoEFeedForward, routing_analytics_off
from workflows.cell.evaluation import peak_memory_mb, reset_peak_memory, timing_batch
from workflows.metric_names import (
    EVAL_INFERENCE_MS_PER_TOKEN,
    EVAL_INFERENCE_PEAK_MB,
    EVAL_INFERENCE_PREFILL_TOKENS_PER_S,
)
from workflows.study.cells import Cell


@torch.no_grad()
def inference_metrics(engine, data: PreparedData | PreparedPairs, cell: Cell, repeats: int = 5,
                      warmup: int = 2) -> dict[str, float]:
    """Call after the training peak was read: this resets the peak counter."""
    batch = timing_batch(data, cell, engine.device)
    tokens = batch.inputs[0].numel()
    engine.eval()
    reset_peak_memory()
    seconds = []
    with routing_analytics_off(engine.module):
        for i in range(warmup + repeats):
            synchronize(engine.device)
            began = time.perf_counter()
            engine(*batch.inputs)
            synchronize(engine.device)
            if i >= warmup:
                seconds.append(time.perf_counter() - began)
    peak = peak_memory_mb()
    metrics = {EVAL_INFERENCE_PREFILL_TOKENS_PER_S: tokens / statistics.median(seconds), EVAL_INFERENCE_PEAK_MB: peak}
    decoding = decoding_of(engine.module, batch.inputs)
    if decoding is not None:
        metrics[EVAL_INFERENCE_MS_PER_TOKEN] = decode_ms_per_token(engine.module, *decoding, engine.device)
    engine.train()
    return metrics


def decoding_of(model, inputs: tuple[torch.Tensor, ...]):
    """(prompt, where decoding starts, new tokens) at batch 1 for a model that decodes with a cache, or None.
    A decoder LM continues the first window's first tokens; an encoder-decoder generates from its start token
    against the first source. The prompt and the new tokens fit in one training window or target, so no position
    goes past what the model was built for. A router that reads domain labels (the reference router, an oracle)
    cannot serve generated tokens, which have none: no figure."""
    if any(getattr(m.router, "needs_domains", False) for m in model.modules() if isinstance(m, MoEFeedForward)):
        return None
    if hasattr(model, "start_decoding"):  # (source, source mask, decoder input, labels)
        src, valid, decoder_in = inputs[0][:1], inputs[1][:1], inputs[2][:1]
        new = min(NEW_TOKENS, decoder_in.shape[1] - 1)
        return decoder_in[:, :1], lambda: model.start_decoding(src, valid), new
    if can_decode(model):
        windows = inputs[0]
        prompt = windows[:1, :min(PROMPT_TOKENS, windows.shape[1] // 2)]
        return prompt, model.new_decoding_state, min(NEW_TOKENS, windows.shape[1] - prompt.shape[1])
    return None
