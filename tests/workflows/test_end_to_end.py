"""A mini study through the real stack: local Ray, Ray Train TorchTrainer, DeepSpeed engines, MLflow on SQLite."""
import contextlib
import csv
import io
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import mlflow
import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from moe_models.characterize import router_cases
from tests.processes import REPO
from workflows.driver.cli import main

pytestmark = pytest.mark.slow

TINY = {
    "name": "mini",
    "seeds": [0],
    "routers": [{"name": "topk", "k": 2, "label": "topk(k=2)", "expert_bias_rate": 0.001,
                 "balancing": {"switch_lbl": 0.01, "z_loss": 0.001, "sequence_lbl": 0.001, "squared_usage": 0.001}},
                {"name": "top_p", "p": 0.51},
                {"name": "reference"}],
    "models": [{"name": "gpt", "d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}],
    "datasets": [{"name": "builtin:domains", "vocab_size": 300, "max_chars_per_domain": 40000}],
    "training": {"steps": 6, "micro_batch_size": 4, "grad_accum_steps": 2, "seq_len": 16, "warmup_steps": 2,
                 "log_interval": 2, "eval_interval": 3, "eval_batches": 2, "checkpoint_interval": 3,
                 "routing_trace_tokens": 24},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 2},
}


@pytest.fixture(scope="module")
def ray_session():
    import ray

    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def mini(tmp_path_factory, ray_session):
    root = tmp_path_factory.mktemp("e2e")
    study = root / "mini.yaml"
    study.write_text(yaml.safe_dump(TINY))
    workdir = root / "work"
    # An empty extension cache: a cell that compiled a DeepSpeed op (the CPU shared-memory all-reduce, ~40 s on a
    # fresh install) would leave it there.
    extensions, before = root / "torch_extensions", os.environ.get("TORCH_EXTENSIONS_DIR")
    os.environ["TORCH_EXTENSIONS_DIR"] = str(extensions)
    output = io.StringIO()
    try:
        with contextlib.redirect_stdout(output):
            code = main(["run", str(study), "--workdir", str(workdir), "--progress-every", "0"])
    finally:
        os.environ.pop("TORCH_EXTENSIONS_DIR") if before is None else os.environ.update(TORCH_EXTENSIONS_DIR=before)
    MINI_OUTPUT.append(output.getvalue())
    MINI_EXTENSIONS.append(extensions)
    client = MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    return code, study, workdir, client


MINI_OUTPUT: list[str] = []  # what the fixture's `moelab run` printed
MINI_EXTENSIONS: list[Path] = []


def cell_runs(client):
    exp = client.get_experiment_by_name("mini")
    return exp, client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")


def test_every_cell_finished_with_provenance_and_metrics(mini, tmp_path):
    from moe_data.prepare import load_prepared, prepare
    from moe_data.spec import DataSpec

    code, _, workdir, client = mini
    assert code == 0
    dataset, seq_len = TINY["datasets"][0], TINY["training"]["seq_len"]
    fixed_windows = load_prepared(prepare(DataSpec(dataset["name"], dataset["vocab_size"],
                                                   dataset["max_chars_per_domain"]), tmp_path)).eval_windows(
        "validation", seq_len)
    exp, runs = cell_runs(client)
    parents = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'study'")
    assert len(parents) == 1 and parents[0].info.status == "FINISHED"
    assert len(runs) == 3
    for run in runs:
        tags, params, metrics = run.data.tags, run.data.params, run.data.metrics
        assert run.info.status == "FINISHED"
        assert tags["mlflow.parentRunId"] == parents[0].info.run_id
        assert tags["router"] in {"topk(k=2)", "top_p(p=0.51)", "reference"} and tags["seed"] == "0"
        assert tags["git_commit"] and len(tags["dataset_fingerprint"]) == 16
        assert tags["version.deepspeed"] == "0.19.8" and tags["version.ray"] == "2.60.0"
        assert params["training.steps"] == "6" and params["model.num_experts"] == "4"
        if tags["router"] == "top_p(p=0.51)":  # a dynamic count, and its correlation with token loss
            assert 1.0 <= metrics["eval/moe/experts_per_token"] <= 4.0
            assert -1.0 <= metrics["eval/moe/difficulty_corr"] <= 1.0
            assert -1.0 <= metrics["eval/moe/difficulty_entropy_corr"] <= 1.0  # per example, predictive entropy
        else:  # fixed k: nothing to correlate, so no difficulty metric is logged
            assert metrics["eval/moe/experts_per_token"] == pytest.approx(2.0 if tags["router"] == "topk(k=2)" else 1.0)
            assert "eval/moe/difficulty_corr" not in metrics and "eval/moe/difficulty_entropy_corr" not in metrics
        # cost: the FLOPs of the experts tokens actually used, MFU against this machine's measured peak
        assert metrics["summary/train_gflops_per_token"] > 0 and 0 < metrics["summary/mfu"] < 1
        assert metrics["summary/tflops_per_device"] == pytest.approx(
            metrics["summary/train_gflops_per_token"] * metrics["summary/tokens_per_s"] / 1e3, rel=1e-6)
        assert 0 < metrics["summary/router_latency_share"] < 1 and "summary/step_seconds" in metrics
        # The final evaluation's routing trace: 24 tokens x 2 MoE blocks, each row the experts its router chose.
        trace = pd.read_parquet(client.download_artifacts(run.info.run_id, "eval/routing_trace.parquet", str(tmp_path)))
        assert len(trace) == 48 and set(trace.layer) == {0, 1}
        assert set(trace.experts.map(len)) <= ({2} if tags["router"] == "topk(k=2)" else {1, 2, 3, 4})
        saturation = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "eval/moe/saturation")}
        assert set(saturation) == {3, 6} and saturation[6] == 1.0 and 0.0 <= saturation[3] <= 1.0
        assert 0 < metrics["eval/moe/purity"] <= 1 and 0.25 <= metrics["eval/moe/utilization"] <= 1
        if tags["router"] == "reference":  # the routing upper bound: each domain on its own expert
            assert metrics["eval/moe/purity"] == 1.0 and metrics["eval/moe/domain_expert_nmi"] == pytest.approx(1.0)
        if tags["router"] == "topk(k=2)":  # scaled = coefficient x unscaled, per block, train and eval
            for split in ("train", "eval"):
                assert metrics[f"{split}/moe/block1/switch_lbl_scaled"] == pytest.approx(
                    0.01 * metrics[f"{split}/moe/block1/switch_lbl_unscaled"])
            assert 0 < metrics["eval/moe/block0/switch_lbl_unscaled"] <= 4  # E * sum f_i P_i lies in (0, E]
            assert metrics["eval/moe/block0/squared_usage_unscaled"] >= 1.0 - 1e-6  # 1 + CV^2 >= 1
            assert metrics["eval/moe/block0/sequence_lbl_scaled"] == pytest.approx(
                0.001 * metrics["eval/moe/block0/sequence_lbl_unscaled"])
        fractions = [metrics[f"eval/moe/block0/expert{e}_fraction"] for e in range(4)]
        assert sum(fractions) == pytest.approx(1.0)
        assert metrics["eval/perplexity"] == pytest.approx(__import__("math").exp(metrics["eval/loss"]), rel=1e-5)
        steps = [m.step for m in client.get_metric_history(run.info.run_id, "train/loss")]
        assert steps == [2, 3, 4, 6]  # log_interval 2 plus the eval steps, each once
        artifacts = {a.path for a in client.list_artifacts(run.info.run_id, "routing")}
        assert artifacts == {"routing/expert_usage.png", "routing/expert_usage.csv", "routing/experts_per_token_hist.csv",
                             "routing/coactivation_block0.csv", "routing/coactivation_block1.csv",
                             "routing/domain_expert_block0.png", "routing/domain_expert_block1.png"}
        heatmap = Path(mlflow.artifacts.download_artifacts(run_id=run.info.run_id, artifact_path="routing/expert_usage.png",
                                                           tracking_uri=client._tracking_client.tracking_uri))
        assert heatmap.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        sequence_losses = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="eval/sequence_losses.json",
            tracking_uri=client._tracking_client.tracking_uri)).read_text())
        # The final evaluation's sequences: every window of the fixed evaluation set (the whole validation split)
        assert len(sequence_losses) == fixed_windows
        assert sum(sequence_losses) / len(sequence_losses) == pytest.approx(metrics["eval/loss"], rel=1e-4)
        config = json.loads(Path(mlflow.artifacts.download_artifacts(
            run_id=run.info.run_id, artifact_path="config/resolved_config.json",
            tracking_uri=client._tracking_client.tracking_uri)).read_text())
        assert config["seed"] == 0 and config["router"]["label"] == tags["router"]
        # The UI's Dataset column: the dataset input, its content fingerprint as the digest
        (dataset,) = [d.dataset for d in run.inputs.dataset_inputs]
        assert dataset.name == "builtin:domains" and dataset.digest == tags["dataset_fingerprint"]
        assert any(k.startswith("system/cpu_utilization") for k in metrics)  # MLflow's system metrics
        assert {"summary/setup_seconds", "summary/train_seconds", "summary/eval_seconds",
                "summary/cell_wall_seconds"} <= set(metrics)  # a cell's overhead reads back from MLflow
        # Two parts of that overhead the cell times itself, inside the driver's launch-to-result wall time
        parts = [metrics[f"summary/{part}_seconds"] for part in ("worker_start", "setup", "train", "final")]
        assert min(parts) > 0 and sum(parts) < metrics["summary/cell_wall_seconds"]
        assert metrics["summary/params_trainable"] == metrics["summary/params_total"] > 0  # trained in full
    headline = parents[0].data.metrics  # the study's own row: each router's best cell
    assert {k for k in headline if k.startswith("best_eval_loss/")} == {
        "best_eval_loss/topk_k_2_", "best_eval_loss/top_p_p_0.51_", "best_eval_loss/reference"}
    assert headline["best_eval_loss/reference"] == next(
        r.data.metrics["eval/loss"] for r in runs if r.data.tags["router"] == "reference")
    # Artifacts live under the workdir, not the test process's cwd.
    assert (workdir / "mlartifacts").is_dir()
    plots = {a.path for a in client.list_artifacts(parents[0].info.run_id, "plots")}
    assert plots == {"plots/pareto.png", "plots/eval_loss_curves.png", "plots/expert_usage_by_router.png"}
    assert all((workdir / "mini_plots" / Path(p).name).stat().st_size > 1000 for p in plots)


def test_run_prints_progress_with_logged_steps_and_compiles_no_deepspeed_op(mini):
    """Off a terminal, progress is plain lines: each names a started cell and a step it logged (2, 3, 4, 6)."""
    text = MINI_OUTPUT[0]
    started = re.findall(r"started  \w+  (.+)", text)
    assert len(started) == 3
    for line in re.findall(r"progress \[.*", text):
        found = re.fullmatch(r"progress \[(\d+)/3 cells done, study ETA \S+\]  (.+)  step (\d+)/6  loss (\S+)  .*", line)
        assert found, line
        assert found.group(2) in started and int(found.group(3)) in (2, 3, 4, 6), line  # logged: every 2 and at evals
        assert float(found.group(4)) > 0
    assert not list(MINI_EXTENSIONS[0].rglob("*.so"))


def test_table_on_disk_has_one_row_per_cell(mini):
    _, _, workdir, _ = mini
    table = (workdir / "mini_table.md").read_text().splitlines()
    assert len(table) == 2 + 3
    assert any("| topk(k=2) |" in row and "| FINISHED |" in row for row in table)
    csv_rows = (workdir / "mini_table.csv").read_text().splitlines()
    assert len(csv_rows) == 4 and csv_rows[0].startswith("cell,router,model")


def test_rerun_skips_finished_cells_without_new_runs(mini, capsys):
    _, study, workdir, client = mini
    _, before = cell_runs(client)
    assert main(["run", str(study), "--workdir", str(workdir)]) == 0
    assert "3 already finished, 0 to run" in capsys.readouterr().out
    _, after = cell_runs(client)
    assert {r.info.run_id: r.info.end_time for r in after} == {r.info.run_id: r.info.end_time for r in before}


def test_status_and_aggregate_read_back_from_mlflow(mini, capsys):
    _, study, workdir, _ = mini
    assert main(["status", str(study), "--workdir", str(workdir)]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 3 and all("FINISHED  step 6/6" in line and "no checkpoint" not in line for line in lines)
    out = workdir / "agg.csv"
    assert main(["aggregate", str(study), "--workdir", str(workdir), "--format", "csv", "--out", str(out)]) == 0
    assert len(out.read_text().splitlines()) == 4


def moelab_stdout(*args: str) -> str:
    """A `moelab` command's stdout as a user's pipe gets it: a fresh process, so import-time library output counts."""
    proc = subprocess.run([sys.executable, "-m", "workflows.driver.cli", *args], cwd=REPO, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def test_machine_readable_output_is_only_the_requested_output(mini):
    """DeepSpeed's accelerator warning and Ray's banners go to stderr: a CSV reader, json.loads and a line-per-cell
    parser take stdout whole."""
    _, study, workdir, _ = mini
    where = [str(study), "--workdir", str(workdir)]
    rows = list(csv.DictReader(io.StringIO(moelab_stdout("aggregate", *where, "--format", "csv"))))
    assert [r["router"] for r in rows] == ["topk(k=2)", "top_p(p=0.51)", "reference"]
    assert all(r["status"] == "FINISHED" for r in rows)
    cells_md, pooled_md = moelab_stdout("aggregate", *where, "--format", "md").split("\n### Seeds pooled\n")
    md = cells_md.strip().splitlines()
    assert md[0].startswith("| cell | router |") and set(md[1]) <= set("|-: ") and len(md) == 2 + 3
    pooled = [line for line in pooled_md.strip().splitlines() if line.startswith("| ")]
    assert pooled[0].startswith("| router | model | dataset | seeds |") and len(pooled) == 1 + 3
    assert "Regime check: not possible" in pooled_md  # mini has no dense baselines
    (frame,) = pd.read_html(io.StringIO(moelab_stdout("aggregate", *where, "--format", "html")))
    assert list(frame["router"]) == ["topk(k=2)", "top_p(p=0.51)", "reference"]
    latex = moelab_stdout("aggregate", *where, "--format", "latex")
    assert latex.startswith(r"\begin{tabular}") and latex.rstrip().endswith(r"\end{tabular}")
    status = moelab_stdout("status", *where).strip().splitlines()
    assert len(status) == 3 and all(re.fullmatch(r"[0-9a-f]{12}  .+  FINISHED  step 6/6  loss \d+\.\d{4}  checkpoint",
                                                 line) for line in status)
    routers = json.loads(moelab_stdout("routers", "--format", "json", "--tokens", "64", "--d-model", "8",
                                       "--experts", "4"))
    assert {r["router"] for r in routers} == set(router_cases(4))


def test_nan_loss_fails_that_cell_with_reason_and_the_study_goes_on(tmp_path, ray_session, capsys):
    study = dict(TINY, name="poisoned", routers=[TINY["routers"][0], {"name": "hash"}],
                 fault_injection={"nan_at_step": 4, "routers": ["hash"]})
    path = tmp_path / "poisoned.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 1
    assert "1 cell(s) failed" in capsys.readouterr().err
    client = MlflowClient(f"sqlite:///{tmp_path / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("poisoned")
    runs = {r.data.tags["router"]: r for r in client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")}
    assert runs["topk(k=2)"].info.status == "FINISHED"
    assert runs["hash"].info.status == "FAILED"
    assert "non-finite loss at step 4" in runs["hash"].data.tags["moelab.failure_reason"]


def test_reference_router_on_unlabelled_data_fails_before_launch(tmp_path, capsys):
    docs = tmp_path / "docs.jsonl"
    docs.write_text("\n".join(json.dumps({"text": f"plain document {i} " * 30}) for i in range(120)))
    study = dict(TINY, name="unlabelled", routers=[{"name": "reference"}],
                 datasets=[{"name": f"file:{docs}", "vocab_size": 300}])
    path = tmp_path / "unlabelled.yaml"
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "router 'reference' routes by domain label" in err and "has none" in err
    assert not (tmp_path / "work" / "ray_results").exists()  # nothing launched
    study = dict(study, routers=[{"name": "hash"}], training={**TINY["training"], "batching": "by_domain"})
    path.write_text(yaml.safe_dump(study))
    assert main(["run", str(path), "--workdir", str(tmp_path / "work")]) == 2
    err = capsys.readouterr().err
    assert "training.batching: by_domain draws each micro-batch from one domain" in err and "no domain labels" in err
    assert not (tmp_path / "work" / "ray_results").exists()


def test_routers_characterized_on_a_trained_cells_hidden_states(mini, capsys):
    _, study, workdir, _ = mini
    assert main(["routers", "--study", str(study), "--workdir", str(workdir), "--format", "json", "--tokens", "256",
                 "--d-model", "16", "--experts", "4"]) == 0
    out = capsys.readouterr().out
    rows = json.loads(out)
    trained = [r for r in rows if r["hidden_states"].startswith("trained: ")]
    random_rows = [r for r in rows if r["hidden_states"] == "random"]
    assert {r["router"] for r in trained} == {r["router"] for r in random_rows}  # the whole registry, twice
    assert trained[0]["hidden_states"] == "trained: topk(k=2) / gpt / builtin:domains / seed 0"  # first finished cell
    by_name = {r["router"]: r for r in trained}
    # Real states are the trained model's width (d_model 32) and its 4 experts: a linear top-k router has 32*4 weights.
    assert by_name["topk"]["parameters"] == 32 * 4 and by_name["hash"]["parameters"] == 0
    assert by_name["reference"]["experts_per_token"] == pytest.approx(1.0)


def test_calibrate_finds_the_top_p_that_spends_a_target_experts_per_token_on_the_trained_cell(mini, capsys):
    """Matched compute by calibration: bisecting p on the trained cell, with the cell's own evaluation, reaches the
    target within ±0.05; at the trained p it reproduces what the cell logged."""
    _, study, workdir, client = mini
    assert main(["calibrate", str(study), "--workdir", str(workdir), "--router", "top_p(p=0.51)", "--target", "2.5",
                 "--format", "json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["option"] == "p" and result["trained_value"] == 0.51
    assert abs(result["experts_per_token"] - 2.5) <= 0.05 and result["evaluations"] <= 40
    assert 0.001 < result["value"] < 1.0 and result["value"] != 0.51
    _, runs = cell_runs(client)
    (top_p,) = [r for r in runs if r.data.tags["router"] == "top_p(p=0.51)"]
    assert result["trained_experts_per_token"] == pytest.approx(top_p.data.metrics["eval/moe/experts_per_token"])
    assert result["trained_eval_loss"] == pytest.approx(top_p.data.metrics["eval/loss"], abs=1e-5)


@pytest.mark.parametrize("router, target, says", [
    ("top_p(p=0.9)", 2.0, "'top_p(p=0.9)' is not a router of mini; its routers: topk(k=2), top_p(p=0.51), reference"),
    ("topk(k=2)", 2.0, "has no knob that sets its experts per token; routers that do: entropy_adaptive, top_any, top_p"),
])  # a target out of the knob's reach: tests/moe_models/test_calibration.py
def test_calibrate_refuses_what_it_cannot_calibrate_with_exit_2_before_loading_anything(mini, capsys, router, target,
                                                                                        says):
    _, study, workdir, _ = mini
    assert main(["calibrate", str(study), "--workdir", str(workdir), "--router", router, "--target", str(target)]) == 2
    assert says in capsys.readouterr().err
