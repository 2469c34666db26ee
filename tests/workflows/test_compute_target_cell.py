"""A cell whose top-p trains at a target compute, through the worker's own DeepSpeed engine, training step and
evaluation: the optimizer step moves each layer's p, and the evaluation logs the p the layers reached."""
from __future__ import annotations

import pytest

from moe_models.routers.compute_target import ComputeTarget
from tests.in_process import in_process_cell
from workflows.cell.evaluation import evaluate
from workflows.cell.loop import train_step
from workflows.cell.worker import Worker
from workflows.metric_names import EVAL_MOE_EXPERTS_PER_TOKEN, EVAL_MOE_KNOB

MODEL = {"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}
DATA = {"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 20000}
TRAINING = {"steps": 30, "micro_batch_size": 4, "seq_len": 16, "warmup_steps": 1}


def study(router: dict) -> dict:
    return {"routers": [router], "models": [MODEL], "datasets": [DATA], "training": TRAINING}


def test_the_training_step_moves_each_layers_knob_toward_the_target_and_the_evaluation_logs_it(tmp_path):
    # p 0.4 on a fresh, near-uniform router spends 2 of 4 experts per token; the target asks for 3.
    engine, cell, data = in_process_cell(tmp_path, study({"name": "top_p", "p": 0.4,
                                                          "target_experts_per_token": 3}))
    worker = Worker(0, 1, None, "")
    before = evaluate(engine, data, cell, worker).metrics
    for step in range(1, TRAINING["steps"] + 1):
        train_step(engine, data, cell, step, worker)
    after = evaluate(engine, data, cell, worker).metrics
    routers = [m for m in engine.module.modules() if isinstance(m, ComputeTarget)]
    assert len(routers) == 2 and all(r.options.p > 0.4 for r in routers)  # each layer's own knob moved up
    assert after[EVAL_MOE_KNOB] == pytest.approx(sum(r.knob_value.item() for r in routers) / 2)
    assert before[EVAL_MOE_KNOB] == pytest.approx(0.4)
    assert abs(after[EVAL_MOE_EXPERTS_PER_TOKEN] - 3) < abs(before[EVAL_MOE_EXPERTS_PER_TOKEN] - 3)


def test_a_router_without_a_target_logs_no_knob(tmp_path):
    engine, cell, data = in_process_cell(tmp_path, study({"name": "top_p", "p": 0.4}))
    assert EVAL_MOE_KNOB not in evaluate(engine, data, cell, Worker(0, 1, None, "")).metrics
