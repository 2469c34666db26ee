"""A pretrained MoE checkpoint at expert parallelism through the real stack: a bf16 Qwen2-MoE saved in four
safetensors shards trains in one cell on 2 Ray Train workers with ep_size 2 over gloo, each rank reading only its
two of the four experts (`summary/checkpoint_expert_share` 1/2; which tensors: tests/moe_models/
test_expert_sharded_load.py)."""
import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.hf_tiny import tiny_causal_lm
from tests.moe_models.test_expert_sharded_load import save_in_shards
from workflows.driver.cli import main
from workflows.metric_names import SUMMARY_CHECKPOINT_EXPERT_SHARE

pytestmark = pytest.mark.slow


def test_a_sharded_bf16_checkpoint_trains_with_each_rank_reading_its_experts(tmp_path, in_process_ray):
    folder = save_in_shards(tiny_causal_lm("qwen2_moe", tmp_path / "fp32", vocab_size=320), tmp_path / "bf16", 4)
    study = {
        "name": "ep-checkpoint",
        "routers": [{"name": "topk", "k": 2}],
        "models": [{"name": "hf", "pretrained": str(folder), "init_router": "pretrained", "ep_size": 2}],
        "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
        "training": {"steps": 8, "micro_batch_size": 4, "seq_len": 32, "warmup_steps": 2, "log_interval": 1,
                     "eval_interval": 8, "eval_batches": 1, "checkpoint_interval": 8, "lr": 0.003},
        "resources": {"workers_per_cell": 2, "cpus_per_worker": 1, "max_concurrent_cells": 1},
    }
    path = tmp_path / "study.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 0
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ep-checkpoint")
    [run] = client.search_runs([experiment.experiment_id], "tags.`moelab.role` = 'cell'")
    assert run.info.status == "FINISHED"
    assert run.data.metrics[SUMMARY_CHECKPOINT_EXPERT_SHARE] == 0.5
    curve = [m.value for m in sorted(client.get_metric_history(run.info.run_id, "train/lm_loss"), key=lambda m: m.step)]
    assert len(curve) == 8 and curve[-1] < curve[0]  # it trained
