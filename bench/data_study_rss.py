"""One cell, trained by `moelab run` end to end, on a synthetic parquet corpus of 5M and of 50M tokens (token budgets
at 90% of each): the worker's peak RSS (`summary/peak_memory_mb`, logged by the cell) must not grow with the corpus,
because the worker memory-maps its shards.

  python bench/data_study_rss.py --out bench/results/data_study_rss_cpu2.json
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.data_pipeline import write_corpus  # noqa: E402
from bench.moe_layer import emit  # noqa: E402

EVAL_TOKENS = 100_000


def study(corpus: Path, label: str, train_tokens: int) -> dict:
    return {
        "name": f"data-rss-{label}", "seeds": [0],
        "routers": [{"name": "topk", "k": 2, "balancing": {"switch_lbl": 0.01}}],
        "models": [{"name": "gpt", "d_model": 64, "n_layers": 2, "n_heads": 4, "num_experts": 4,
                    "expert_hidden": 128}],
        "datasets": [{"name": f"file:{corpus}/*.parquet", "vocab_size": 4096, "train_tokens": train_tokens,
                      "eval_tokens": EVAL_TOKENS, "tokenizer_sample_chars": 5_000_000}],
        "training": {"steps": 40, "micro_batch_size": 8, "seq_len": 128, "eval_interval": 40,
                     "checkpoint_interval": 40, "log_interval": 10},
        "resources": {"workers_per_cell": 1, "cpus_per_worker": 1},
    }


def run(tokens: float, tmp: Path) -> dict:
    import mlflow

    label = f"{tokens / 1e6:g}M"
    corpus, workdir = tmp / f"corpus-{label}", tmp / f"work-{label}"
    write_corpus(corpus, int(tokens / 1.15))
    path = tmp / f"{label}.yaml"
    path.write_text(yaml.safe_dump(study(corpus, label, int(tokens * 0.9))))
    began = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "workflows.driver.cli", "run", str(path), "--workdir", str(workdir)],
                          cwd=REPO, capture_output=True, text=True)
    if done.returncode:
        raise RuntimeError(done.stdout[-2000:] + done.stderr[-3000:])
    client = mlflow.MlflowClient(f"sqlite:///{workdir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name(f"data-rss-{label}")
    runs = [r for r in client.search_runs([experiment.experiment_id]) if "summary/peak_memory_mb" in r.data.metrics]
    assert len(runs) == 1 and runs[0].info.status == "FINISHED", [r.info.status for r in runs]
    metrics = runs[0].data.metrics
    return {"corpus_tokens_target": int(tokens), "train_tokens": int(tokens * 0.9), "eval_tokens": EVAL_TOKENS,
            "status": runs[0].info.status, "study_seconds": round(time.perf_counter() - began, 1),
            "worker_peak_rss_mb": round(metrics["summary/peak_memory_mb"], 1),
            "eval_loss": round(metrics["eval/loss"], 4)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, nargs=2, default=[5e6, 50e6])
    parser.add_argument("--out")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="moelab-bench-rss-") as tmp:
        small, large = (run(t, Path(tmp)) for t in args.tokens)
    emit({"small": small, "large": large,
          "worker_peak_rss_large_minus_small_mb": round(large["worker_peak_rss_mb"] - small["worker_peak_rss_mb"], 1),
          "worker_peak_rss_large_over_small": round(large["worker_peak_rss_mb"] / small["worker_peak_rss_mb"], 3)},
         args.out)


if __name__ == "__main__":
    main()
