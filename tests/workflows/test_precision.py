"""Mixed precision through real DeepSpeed engines, in process.

bf16 runs on DeepSpeed's CPU accelerator. fp16 does too where the CPU has AVX512-FP16; this one has not, so the fp16
test patches DeepSpeed's capability check (the hardware is what cannot exist here): torch computes fp16 on any CPU,
and the engine, its FP16 optimizer and its dynamic loss scaler are DeepSpeed's own.
"""
import math

import pytest
import torch
from deepspeed.accelerator import get_accelerator

from tests.in_process import in_process_cell
from workflows.cell.inference_cost import inference_metrics
from workflows.cell.loop import train_step
from workflows.cell.summarize import generate_summaries
from workflows.cell.summarize import test_documents as documents_to_summarize
from workflows.cell.worker import Worker
from workflows.metric_names import EVAL_INFERENCE_MS_PER_TOKEN, EVAL_INFERENCE_PREFILL_TOKENS_PER_S

ROUTER = {"name": "topk", "k": 2, "expert_bias_rate": 0.01}
GPT = {"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 64}
SEQ2SEQ = {"name": "seq2seq", "d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
           "num_experts": 4, "expert_hidden": 32}


def build(tmp_path, precision: str, steps: int, unvalidated: dict | None = None, model: dict = GPT,
          dataset: str = "builtin:domains", **training):
    """A tiny cell's (engine, cell, data)."""
    return in_process_cell(tmp_path, {
        "routers": [ROUTER], "models": [model],
        "datasets": [{"name": dataset, "vocab_size": 300, "max_chars_per_domain": 100_000}],
        "training": {"steps": steps, "micro_batch_size": 4, "seq_len": 32, "target_len": 12, "warmup_steps": 2,
                     "lr": 3e-3, "precision": precision, **training},
        "summarization": {"eval_documents": 2, "eval_batch_size": 2, "max_new_tokens": 4, "num_beams": 2},
        "resources": {"gpus_per_worker": 1 if precision == "fp16" else 0}}, unvalidated)


def train(tmp_path, precision: str, steps: int, unvalidated: dict | None = None,
          **kwargs) -> tuple[object, list[dict]]:
    """`steps` training steps; the engine and each step's metrics."""
    engine, cell, data = build(tmp_path, precision, steps, unvalidated, **kwargs)
    worker = Worker(0, 1, None, "")
    return engine, [train_step(engine, data, cell, step, worker) for step in range(1, steps + 1)]


def routing_state_dtypes(engine) -> set[torch.dtype]:
    return {b.dtype for name, b in engine.module.named_buffers() if name.endswith(("bias_E", "counts_E", "routes_E"))}


@pytest.mark.slow
def test_bf16_engine_trains_the_fp32_curve_with_bf16_weights_and_fp32_routing_state(tmp_path):
    _, fp32 = train(tmp_path, "fp32", 8)
    engine, bf16 = train(tmp_path, "bf16", 8)
    assert next(engine.module.parameters()).dtype == torch.bfloat16
    assert routing_state_dtypes(engine) == {torch.float32}  # the expert bias and counts are accumulators
    bias = engine.module.blocks[0].ffn.router.expert_bias_E
    assert bias.abs().sum() > 0  # and it moved
    engine.save_checkpoint(tmp_path / "ckpt", tag="bf16")  # a resumed bf16 cell gets its fp32 bias back, bit for bit
    resumed, *_ = build(tmp_path, "bf16", 8)
    resumed.load_checkpoint(tmp_path / "ckpt", tag="bf16")
    assert torch.equal(resumed.module.blocks[0].ffn.router.expert_bias_E, bias)
    curve, reference = [m["train/lm_loss"] for m in bf16], [m["train/lm_loss"] for m in fp32]
    assert curve[-1] < curve[0]
    assert curve == pytest.approx(reference, rel=2e-2)  # bf16 keeps ~3 significant digits per op


@pytest.mark.slow
def test_bf16_summarization_cell_trains_and_decodes_in_bf16(tmp_path):
    """DeepSpeed's bf16 engine casts parameters, not buffers: the encoder-decoder's fp32 sinusoid table once promoted
    its residual stream to fp32, and the first LayerNorm (bf16 weights) refused it."""
    engine, cell, data = build(tmp_path, "bf16", 2, model=SEQ2SEQ, dataset="builtin:docstrings")
    assert engine.module.pos_table.dtype == torch.float32  # DeepSpeed kept the buffer fp32 ...
    states = []
    hook = engine.module.ln_enc.register_forward_hook(lambda _m, args, out: states.append(args[0].dtype))
    worker = Worker(0, 1, None, "")
    curve = [train_step(engine, data, cell, step, worker)["train/lm_loss"] for step in (1, 2)]
    hook.remove()
    assert states == [torch.bfloat16] * 2  # ... and the residual stream is bf16
    assert all(math.isfinite(loss) for loss in curve)
    summaries = generate_summaries(engine.module, data, cell.summarization, cell.training.seq_len)
    assert len(summaries) == documents_to_summarize(data, cell.summarization) > 0
    cost = inference_metrics(engine, data, cell)  # cached greedy decoding against the source, in bf16 too
    assert cost[EVAL_INFERENCE_MS_PER_TOKEN] > 0 and cost[EVAL_INFERENCE_PREFILL_TOKENS_PER_S] > 0


@pytest.fixture
def fp16_capable(monkeypatch):
    monkeypatch.setattr(type(get_accelerator()), "is_fp16_supported", lambda self: True)


@pytest.mark.slow
def test_fp16_engine_scales_its_loss_skips_overflowing_steps_and_then_trains(tmp_path, fp16_capable):
    _, fp32 = train(tmp_path, "fp32", 12)
    engine, fp16 = train(tmp_path, "fp16", 12, fp16_initial_scale_power=20, zero_stage=1)
    assert next(engine.module.parameters()).dtype == torch.float16
    assert routing_state_dtypes(engine) == {torch.float32}
    scales, skipped = [m["train/loss_scale"] for m in fp16], [m["train/skipped_steps"] for m in fp16]
    # A loss scaled by 2**20 overflows fp16 gradients: those steps are skipped and the scale halves (after DeepSpeed's
    # hysteresis of 2) until the gradients fit; then every step applies.
    assert skipped[0] == 1 and scales[0] == 2.0**20
    assert skipped == sorted(skipped) and 1 < skipped[-1] < 6 and skipped[-3:] == [skipped[-1]] * 3
    assert scales == sorted(scales, reverse=True) and scales[-1] < 2.0**20
    initial = fp16[skipped[-1]]["train/lm_loss"]  # the first applied step's loss, still on the initial weights
    assert fp16[-1]["train/lm_loss"] < initial - 0.1
    # The initial weights' loss in fp16 is the fp32 model's to fp16's precision.
    assert fp16[0]["train/lm_loss"] == pytest.approx(fp32[0]["train/lm_loss"], rel=2e-3)


@pytest.mark.slow
def test_deepspeed_still_leaves_the_fp16_loss_unscaled_at_zero_stage_0(tmp_path, fp16_capable):
    """Why the study schema refuses fp16 with zero_stage 0 (deepspeedai/DeepSpeed#8393): the engine's backward scales the
    loss only for ZeRO optimizers, while FP16_Optimizer's step divides the gradients by the scale. A 2**30 scale
    would overflow every fp16 gradient; here nothing overflows because nothing was scaled. When this test fails,
    DeepSpeed has fixed it: lift the restriction in Study._fp16_problems."""
    engine, fp16 = train(tmp_path, "fp16", 3, {"zero_stage": 0}, fp16_initial_scale_power=30, zero_stage=1)
    assert engine.zero_optimization_stage() == 0
    assert [m["train/skipped_steps"] for m in fp16] == [0, 0, 0]
