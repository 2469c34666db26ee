"""What a trained cell costs at inference, measured once at its end on one evaluation micro-batch (the same for
every cell of a study):
- `eval/inference/prefill_tokens_per_s`: tokens of the batch's first input (an LM's windows, a seq2seq model's
  source documents) per second of a no-grad forward, routing analytics off; the median of 5 after 2 warm-ups;
- `eval/inference/peak_mb`: the worker's peak memory during those forwards alone: the accelerator's peak counter,
  or on CPU the process's resident high-water mark (Linux VmHWM), each reset just before, so that training's peak
  cannot hide it. On CPU it includes what is resident then: the weights, and the optimizer state beside them.
Every rank runs the forwards (expert parallelism holds collectives in them); rank 0's figures are logged.
Decoding latency per generated token needs a KV cache, which moelab's own families do not have yet."""
from __future__ import annotations

import statistics
import time

import torch

from moe_data.prepare import PreparedData
from moe_data.prepared_pairs import PreparedPairs
from moe_models.moe_ffn import routing_analytics_off
from workflows.cell.evaluation import peak_memory_mb, reset_peak_memory, timing_batch
from workflows.metric_names import EVAL_INFERENCE_PEAK_MB, EVAL_INFERENCE_PREFILL_TOKENS_PER_S
from workflows.study.cells import Cell


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


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
            _synchronize(engine.device)
            began = time.perf_counter()
            engine(*batch.inputs)
            _synchronize(engine.device)
            if i >= warmup:
                seconds.append(time.perf_counter() - began)
    engine.train()
    return {EVAL_INFERENCE_PREFILL_TOKENS_PER_S: tokens / statistics.median(seconds),
            EVAL_INFERENCE_PEAK_MB: peak_memory_mb()}
