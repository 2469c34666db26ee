"""A summarization mini-study through the real stack (local Ray, Ray Train, DeepSpeed, MLflow on SQLite): metrics
with bootstrap CIs in MLflow, per-document predictions, encoder and decoder heatmaps, the comparison table, the
report with paired p-values, and a blind rating sheet whose key is kept apart."""
import csv
import io
import json

import pytest
import yaml
from mlflow.tracking import MlflowClient

from tests.hf_tiny import tiny_bart
from tests.suite import extended
from workflows.driver.cli import main

pytestmark = [pytest.mark.slow, extended(
    "tests/workflows/test_precision.py::test_bf16_summarization_cell_trains_and_decodes_in_bf16",
    "tests/workflows/test_pretrained.py::test_local_model_summarizes_every_document_deterministically",
    "tests/workflows/test_pooled_summarization.py::test_rouge_is_pooled_across_seeds_like_every_metric",
    "tests/workflows/test_pooled_summarization.py::test_document_table_and_bootstrap_against_the_baseline",
    "tests/workflows/test_ratings.py::test_the_cli_reads_filled_sheets_and_exits_2_on_a_bad_one",
    "tests/workflows/test_end_to_end.py::test_every_cell_finished_with_provenance_and_metrics")]

MINI = {
    "name": "mini_sum",
    "seeds": [0, 1],
    "routers": [{"name": "topk", "k": 2, "label": "top2", "balancing": {"switch_lbl": 0.01}}, {"name": "hash"}],
    "models": [{"name": "seq2seq", "d_model": 32, "n_heads": 2, "encoder_layers": 1, "decoder_layers": 1,
                "num_experts": 4, "expert_hidden": 32}],
    "datasets": [{"name": "builtin:docstrings", "vocab_size": 400, "max_chars_per_domain": 300_000}],
    "training": {"steps": 6, "micro_batch_size": 4, "seq_len": 48, "target_len": 12, "warmup_steps": 2,
                 "eval_interval": 3, "eval_batches": 2, "checkpoint_interval": 6, "log_interval": 3},
    "summarization": {"eval_documents": 10, "eval_batch_size": 5, "max_new_tokens": 8, "num_beams": 2,
                      "baseline": "top2", "bootstrap_resamples": 100, "samples": 3},
    "resources": {"workers_per_cell": 1, "cpus_per_worker": 1, "max_concurrent_cells": 2},
}


@pytest.fixture(scope="module")
def study_run(tmp_path_factory):
    import ray

    root = tmp_path_factory.mktemp("sum")
    bart = str(tiny_bart(root / "tiny-bart"))
    study = {**MINI, "summarization": {**MINI["summarization"], "pretrained": [
        {"model": bart, "kind": "seq2seq", "label": "tiny-bart"},
        {"model": bart, "kind": "seq2seq", "finetune": {"method": "lora", "steps": 20, "batch_size": 2}}]}}
    path = root / "mini_sum.yaml"
    path.write_text(yaml.safe_dump(study))
    code = main(["run", str(path), "--workdir", str(root / "work")])
    ray.shutdown()
    client = MlflowClient(f"sqlite:///{root / 'work' / 'mlflow.db'}")
    exp = client.get_experiment_by_name("mini_sum")
    return code, root / "work", client, exp


def test_cells_log_summary_metrics_with_confidence_intervals(study_run):
    code, _, client, exp = study_run
    assert code == 0
    runs = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'cell'")
    assert len(runs) == 4 and all(r.info.status == "FINISHED" for r in runs)
    for run in runs:
        m = run.data.metrics
        for metric in ("rouge1", "rouge2", "rougeL", "bleu", "bertscore_f1", "coverage", "density", "compression"):
            assert m[f"test/{metric}_ci_low"] <= m[f"test/{metric}"] <= m[f"test/{metric}_ci_high"], metric
        assert 0 <= m["test/rouge1"] <= 1 and -1 <= m["test/bertscore_f1"] <= 1
        assert run.data.tags["moelab.bleu_signature"].startswith("nrefs:1|")
        rows = [json.loads(line) for line in
                open(client.download_artifacts(run.info.run_id, "summaries/test_predictions.jsonl"))]
        assert len(rows) == 10 and all(isinstance(r["prediction"], str) for r in rows)
        assert m["test/rouge1"] == pytest.approx(sum(r["rouge1"] for r in rows) / 10)
        routing = {a.path for a in client.list_artifacts(run.info.run_id, "routing")}
        assert {"routing/expert_usage_encoder.png", "routing/expert_usage_decoder.png"} <= routing
        pair_losses = json.loads(open(client.download_artifacts(run.info.run_id, "eval/sequence_losses.json")).read())
        assert len(pair_losses) == 2 * 4  # eval_batches x micro_batch_size pairs: the eval loss's bootstrap pairs them
        assert min(pair_losses) <= m["eval/loss"] <= max(pair_losses)  # the loss is their length-weighted mean


def test_pretrained_baseline_is_an_evaluation_only_run_scored_like_the_cells(study_run):
    _, workdir, client, exp = study_run
    runs = {r.data.tags["router"]: r for r in
            client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'pretrained'")}
    assert set(runs) == {"tiny-bart", "tiny-bart+LoRA"} and all(r.info.status == "FINISHED" for r in runs.values())
    tuned = runs["tiny-bart+LoRA"]  # LoRA-tuned on the training pairs, then scored alike
    assert [m.step for m in client.get_metric_history(tuned.info.run_id, "finetune/loss")] == [10, 20]
    assert 0 < tuned.data.metrics["summary/params_trainable"] < tuned.data.metrics["summary/params_total"]
    assert tuned.data.metrics["test/rouge1_ci_low"] <= tuned.data.metrics["test/rouge1"]
    runs = [runs["tiny-bart"]]
    m = runs[0].data.metrics
    assert m["test/rouge1_ci_low"] <= m["test/rouge1"] <= m["test/rouge1_ci_high"]
    assert runs[0].data.tags["dataset_fingerprint"] and runs[0].data.tags["version.transformers"]
    report = (workdir / "mini_sum_summarization.md").read_text()
    assert "| tiny-bart | 1 (no CI: < 3 seeds) |" in report  # one seed: no interval, and the table says so
    assert sum(line.startswith("| tiny-bart |") for line in report.splitlines()) == 2 + 3


def test_table_report_and_blind_rating_sheet(study_run):
    _, workdir, client, exp = study_run
    table = (workdir / "mini_sum_table.md").read_text()
    assert "ROUGE-1" in table and "BERTScore F1" in table and "purity" not in table  # no domain labels here
    report = (workdir / "mini_sum_summarization.md").read_text()
    # Two seeds each: means without an interval, said in the table, as in every pooled table.
    assert "| top2 | 2 (no CI: < 3 seeds) |" in report and "| hash | 2 (no CI: < 3 seeds) |" in report
    assert "bootstrap p-value" in report and "seeds resampled" in report
    hash_row = next(line for line in report.splitlines() if line.startswith("| hash |") and "(" in line
                    and "no CI" not in line)  # the p-value table
    p_values = [float(cell.split("(")[1].rstrip(") ")) for cell in hash_row.split("|")[2:-1]]
    assert len(p_values) == 5 and all(0 <= p <= 1 for p in p_values)
    assert report.count("| reference |") == 3  # three sample documents
    sheet_path = next(workdir.glob("mini_sum_*_rating_sheet.csv"))
    sheet = list(csv.DictReader(io.StringIO(sheet_path.read_text())))
    assert len(sheet) == 3 * 4 and {r["system_id"] for r in sheet} == {"S1", "S2", "S3", "S4"}  # + the LoRA-tuned one
    assert not any(label in sheet_path.read_text() for label in ("top2", "hash", "tiny-bart"))  # blind
    key = dict(list(csv.reader(io.StringIO(next(workdir.glob("mini_sum_*_rating_key.csv")).read_text())))[1:])
    assert sorted(key.values()) == ["hash", "tiny-bart", "tiny-bart+LoRA", "top2"]
    # A rater fills the sheet (content: 5 for the reference-free top2, 1 for the rest); the study reads it back.
    from workflows.report.ratings import criterion_header, pooled_ratings

    for row in sheet:
        assert all(row[criterion_header(c)] == "" for c in ("content", "fluency"))  # the scale is in the column
        row[criterion_header("content")] = "5" if key[row["system_id"]] == "top2" else "1"
    filled = workdir / "filled.csv"
    with open(filled, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(sheet[0]))
        writer.writeheader()
        writer.writerows(sheet)
    rated = {r.system: r for r in pooled_ratings([filled], next(workdir.glob("mini_sum_*_rating_key.csv")))}
    assert rated["top2"].means["content"][0] == 5.0 and rated["hash"].means["content"][0] == 1.0
    assert rated["top2"].n == 3
    parent = client.search_runs([exp.experiment_id], "tags.`moelab.role` = 'study'")[0]
    logged = {a.path for a in client.list_artifacts(parent.info.run_id, "summarization")}
    assert {f"summarization/{sheet_path.name}", "summarization/mini_sum_summarization.md"} <= logged
    # Two seeds: ROUGE-L against compute with the seeds' spread, loss curves, and both routers' expert usage.
    plots = {a.path for a in client.list_artifacts(parent.info.run_id, "plots")}
    assert plots == {"plots/pareto.png", "plots/eval_loss_curves.png", "plots/expert_usage_by_router.png"}
