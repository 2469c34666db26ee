"""The routing trace of a cell's final evaluation: a bounded table of (token, block) -> experts and gate weights,
equal to the routing decisions of the evaluation itself, written as parquet that pandas reads back."""
import pandas as pd
import torch

from moe_models.models.common import LMOutput
from tests.in_process import in_process_cell
from workflows.cell.evaluation import eval_batches, evaluate
from workflows.cell.routing_trace import COLUMNS
from workflows.cell.worker import Worker

STUDY = {"routers": [{"name": "topk", "k": 2, "null_experts": 2}],
         "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4,
                     "expert_hidden": 32}],
         "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 20000}],
         "training": {"steps": 2, "micro_batch_size": 4, "seq_len": 16, "warmup_steps": 1}}


def test_the_trace_is_the_evaluations_routing_bounded_and_readable(tmp_path):
    engine, cell, data = in_process_cell(tmp_path, STUDY)
    worker = Worker(0, 1, None, "")
    evaluation = evaluate(engine, data, cell, worker, trace_tokens=70)  # 4 windows of 16, and 6 tokens of a fifth
    frame = pd.read_parquet(evaluation.trace.write(tmp_path / "trace.parquet"))
    assert list(frame.columns) == list(COLUMNS) and len(frame) == 70 * 2  # every token in each MoE block
    assert sorted(frame.layer.unique()) == [0, 1] and frame.sequence.max() == 4 and frame.position.max() == 15
    # The same routing as the evaluation's first forwards, token by token (null experts: a variable number of experts).
    engine.eval()
    with torch.no_grad():
        first = next(iter(eval_batches(data, cell, worker)))
        out: LMOutput = engine(*first.inputs)
    decision = out.moe[1].decision
    rows = frame[(frame.layer == 1) & (frame.sequence == 0)].sort_values("position")
    for t, row in enumerate(rows.itertuples()):
        active = decision.active_TK[t]
        assert list(row.experts) == decision.expert_ids_TK[t][active].tolist()
        assert list(row.weights) == pytest_approx(decision.weights_TK[t][active].tolist())
        assert row.token_id == first.inputs[0][0, t].item() and row.domain == first.inputs[2][0, t].item()
    assert frame.experts.map(len).nunique() > 1  # null routes: tokens differ in how many experts they use


def pytest_approx(values):
    import pytest

    return pytest.approx(values, rel=1e-6)


def test_without_a_budget_there_is_no_trace(tmp_path):
    engine, cell, data = in_process_cell(tmp_path, STUDY)
    assert evaluate(engine, data, cell, Worker(0, 1, None, "")).trace is None
