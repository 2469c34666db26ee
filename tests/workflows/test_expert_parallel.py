"""Expert parallelism through the real stack: 2 Ray Train workers with ep_size=2 (gloo all-to-all, each worker holds
2 of the 4 experts) against 1 worker holding all 4 with 2 accumulation steps — the same global batches (data order is
keyed by the global micro-batch index) and the same initial weights (experts initialized by global id), so the loss
curves must agree up to floating-point reduction order. Both dispatch backends: the grouped one's expert parallelism
(variable-size all-to-all, DeepSpeed's EP groups) must reproduce the DeepSpeed backend's single-worker curve, for GELU
experts (gpt) and SwiGLU experts with a gated shared expert (llama) alike."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.suite import extended
from workflows.driver.cli import main

pytestmark = [pytest.mark.slow, extended(
    "tests/workflows/test_expert_parallel_checkpoint.py::test_a_sharded_bf16_checkpoint_trains_with_each_rank_reading_its_experts",
    "tests/moe_models/test_moe_layer.py::test_grouped_backend_matches_deepspeed_outputs_and_gradients",
    "tests/moe_models/test_moe_layer.py::test_grouped_expert_parameters_are_marked_for_deepspeed",
    "tests/moe_models/test_balancing_scope.py::test_global_batch_lbl_equals_the_lbl_of_the_concatenated_batch")]

BASE = {
    "routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 8, "micro_batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_interval": 1,
                 "eval_interval": 8, "eval_batches": 1, "checkpoint_interval": 8},
}
MODEL = {"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 64}
LLAMA = {"name": "llama", "d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "num_experts": 4,
         "expert_hidden": 32, "num_shared_experts": 1, "shared_expert_gate": True}


def loss_curves(tmp_path, name: str, workers: int, accum: int, ep_size: int, dispatch: str = "deepspeed",
                models: tuple[dict, ...] = (MODEL,)) -> dict[str, list[float]]:
    """model name -> its cell's train/lm_loss curve."""
    study = dict(BASE, name=name, models=[dict(m, ep_size=ep_size, dispatch=dispatch) for m in models],
                 training=dict(BASE["training"], grad_accum_steps=accum),
                 resources={"workers_per_cell": workers, "cpus_per_worker": 1, "max_concurrent_cells": 1})
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name(name)
    curves = {}
    for run in client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'"):
        history = sorted(client.get_metric_history(run.info.run_id, "train/lm_loss"), key=lambda m: m.step)
        curves[run.data.tags["model"]] = [m.value for m in history]
    return curves


def test_ep2_over_two_workers_matches_one_worker_holding_every_expert(tmp_path, in_process_ray):
    single = loss_curves(tmp_path, "single", workers=1, accum=2, ep_size=1, models=(MODEL, LLAMA))
    expert_parallel = loss_curves(tmp_path, "ep2", workers=2, accum=1, ep_size=2)["gpt"]
    grouped_expert_parallel = loss_curves(tmp_path, "ep2-grouped", workers=2, accum=1, ep_size=2, dispatch="grouped",
                                          models=(MODEL, LLAMA))
    assert len(single["gpt"]) == len(expert_parallel) == len(grouped_expert_parallel["gpt"]) == 8
    assert expert_parallel == pytest.approx(single["gpt"], rel=2e-3)
    for family in ("gpt", "llama"):
        assert grouped_expert_parallel[family] == pytest.approx(single[family], rel=2e-3), family
        assert single[family][-1] < single[family][0]  # it trained: a curve worth comparing
    # DeepSpeed saved the grouped layers' experts as its own per-expert shards, each rank its global experts.
    cells = tmp_path / "work" / "ray_results" / "ep2-grouped"
    shards = {p.name for p in cells.rglob("layer_*_expert_*_model_states.pt")}
    assert {f"layer_{layer}_expert_{e}_mp_rank_00_model_states.pt" for layer in (0, 1) for e in range(4)} <= shards
