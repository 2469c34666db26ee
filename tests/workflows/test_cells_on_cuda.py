"""A cell's worker code on a GPU, in process: DeepSpeed puts the model on the accelerator and the host-built batches
must follow it. These need a GPU and run where one exists (the device machine); on CPU-only CI they are skipped — a
GPU cannot exist there. CPU runs of the same code are the rest of the suite."""
import pytest
import torch

from tests.in_process import in_process_cell
from workflows.cell.summarize import generate_summaries
from workflows.cell.summarize import test_documents as documents_to_summarize
from workflows.cell.evaluation import evaluate, final_cost_metrics
from workflows.cell.loop import train_step
from workflows.cell.worker import Worker

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

GPT = {"name": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 128}
SEQ2SEQ = {"name": "seq2seq", "d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
           "num_experts": 4, "expert_hidden": 32}


def cell_on_gpu(tmp_path, router: dict, model: dict, dataset: str, **training):
    engine, cell, data = in_process_cell(tmp_path, {
        "routers": [router], "models": [model],
        "datasets": [{"name": dataset, "vocab_size": 400, "max_chars_per_domain": 100_000}],
        "training": {"steps": 4, "micro_batch_size": 4, "seq_len": 48, "target_len": 12, "warmup_steps": 1,
                     "eval_batches": 2, **training},
        "summarization": {"eval_documents": 4, "eval_batch_size": 2, "max_new_tokens": 6, "num_beams": 2},
        "resources": {"gpus_per_worker": 1}})
    assert engine.device == torch.device("cuda", torch.cuda.current_device())  # the GPU Ray Train makes current
    assert next(engine.module.parameters()).device == engine.device
    return engine, cell, data


@pytest.mark.parametrize("router,training", [
    ({"name": "topk", "k": 2, "expert_bias_rate": 0.01}, {"precision": "bf16"}),
    ({"name": "top_p", "p": 0.5, "max_k": 4}, {"precision": "bf16", "compile": True}),
    ({"name": "topk", "k": 2}, {"precision": "fp16", "zero_stage": 1, "fp16_initial_scale_power": 8}),
    ({"name": "hash"}, {"precision": "fp32"}),
], ids=["topk-bf16", "top_p-bf16-compiled", "topk-fp16", "hash-fp32"])
def test_lm_cell_trains_evaluates_and_costs_on_the_gpu(tmp_path, router, training):
    engine, cell, data = cell_on_gpu(tmp_path, router, GPT, "builtin:domains", **training)
    worker = Worker(0, 1, None, "")
    curve = [train_step(engine, data, cell, step, worker)["train/lm_loss"] for step in range(1, 5)]
    assert all(torch.isfinite(torch.tensor(curve)))
    evaluation = evaluate(engine, data, cell, worker)
    assert evaluation.metrics["eval/loss"] < 10 and 0 < evaluation.metrics["eval/moe/utilization"] <= 1
    assert all(not mask.is_cuda for mask in evaluation.routes.values())  # snapshots live on the host
    cost = final_cost_metrics(engine, data, cell, 1000.0, evaluation.metrics, 0.1)
    assert cost["summary/peak_tflops"] > 10  # a GPU's matmul peak, measured on it
    assert 0 < cost["summary/router_latency_share"] < 1


def test_summarization_cell_decodes_on_the_gpu(tmp_path):
    engine, cell, data = cell_on_gpu(tmp_path, {"name": "topk", "k": 2}, SEQ2SEQ, "builtin:docstrings",
                                     precision="bf16")
    worker = Worker(0, 1, None, "")
    for step in range(1, 3):
        train_step(engine, data, cell, step, worker)
    summaries = generate_summaries(engine.module, data, cell.summarization, cell.training.seq_len)
    assert len(summaries) == documents_to_summarize(data, cell.summarization) > 0
    assert all(isinstance(s, str) for s in summaries)
