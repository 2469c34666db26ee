"""`training.compile`: the cell's DeepSpeed engine runs a torch.compile'd model (engine.compile). A compiled cell must
train the eager cell's curve, evaluate to the same numbers, and still measure its router share (hooks run eagerly)."""
import pytest

from tests.in_process import in_process_cell
from tests.suite import extended
from workflows.cell.evaluation import evaluate, final_cost_metrics
from workflows.cell.loop import StepTimes, train_step
from workflows.cell.worker import Worker

STEPS = 6


def train_and_evaluate(tmp_path, router: dict, compile: bool):
    engine, cell, data = in_process_cell(tmp_path, {
        "routers": [router],
        "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 64}],
        "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 20000}],
        "training": {"steps": STEPS, "micro_batch_size": 4, "seq_len": 32, "warmup_steps": 2, "eval_batches": 2,
                     "compile": compile}})
    assert engine.is_compiled == compile
    worker = Worker(0, 1, None, "")
    curve = [train_step(engine, data, cell, step, worker)["train/lm_loss"] for step in range(1, STEPS + 1)]
    evaluation = evaluate(engine, data, cell, worker)
    return engine, cell, data, curve, evaluation.metrics


@pytest.mark.slow
@extended("tests/moe_models/test_moe_layer.py::test_grouped_gemm_path_never_reads_a_tensor_on_the_host",
          "tests/moe_models/test_moe_layer.py::test_filler_rows_through_torchs_grouped_gemm_give_the_read_plan_outputs",
          "tests/workflows/test_compile.py::test_throughput_leaves_out_the_first_step")
@pytest.mark.parametrize("router", [{"name": "topk", "k": 2}, {"name": "top_p", "p": 0.5}], ids=["topk", "top_p"])
def test_compiled_cell_trains_and_evaluates_like_the_eager_cell(tmp_path, router):
    eager, *_, eager_curve, eager_eval = train_and_evaluate(tmp_path, router, compile=False)
    engine, cell, data, curve, evaluation = train_and_evaluate(tmp_path, router, compile=True)
    assert curve[-1] < curve[0]  # it trained
    assert curve == pytest.approx(eager_curve, rel=1e-4)  # fp32 on CPU: fused kernels reorder a few sums
    for key in ("eval/loss", "eval/moe/experts_per_token", "eval/moe/load_cv"):
        assert evaluation[key] == pytest.approx(eager_eval[key], rel=1e-4), key
    cost = final_cost_metrics(engine, data, cell, 1000.0, evaluation, 0.1)
    assert 0 < cost["summary/router_latency_share"] < 1  # its timing hooks fired: the forwards ran eagerly
    # A compiled cell's checkpoint is an eager cell's (same keys): resuming with compile toggled loses nothing.
    engine.save_checkpoint(tmp_path / "ckpt", tag="compiled")
    eager.load_checkpoint(tmp_path / "ckpt", tag="compiled")
    loaded = evaluate(eager, data, cell, Worker(0, 1, None, "")).metrics["eval/loss"]
    assert loaded == pytest.approx(evaluation["eval/loss"], rel=1e-5)


def test_throughput_leaves_out_the_first_step():
    times = StepTimes()
    times.add(5.0)  # compile, lazy initialisation
    assert times.steady_step_seconds == 5.0  # a one-step run has nothing else to go on
    times.add(1.0)
    times.add(3.0)
    assert (times.first, times.steady_step_seconds, times.total) == (5.0, 2.0, 9.0)
