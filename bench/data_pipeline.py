"""The data path at scale: a synthetic parquet corpus (written by this bench) prepared into token shards by the Ray
Data job with 1 and 2 CPUs, and a worker that reads batches from the shards.

Measured at two corpus sizes (default 10M and 50M tokens), each in a fresh process:
- preparation throughput (tokens/s) with 1 and 2 CPUs, and its scaling;
- peak RSS of preparation: the driver alone, and the whole process tree (driver, raylet, Ray Data's workers);
- a worker's RSS after opening the shards and drawing 100 batches.
The ratios side by side (50M over 10M: 1.0 means memory does not grow with the corpus) come from one run.

  python bench/data_pipeline.py --out bench/results/data_pipeline_cpu2.json
"""
from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.moe_layer import emit  # noqa: E402

FILES = 32  # parquet files: Ray Data reads (and tokenizes) each in its own task
VOCAB = 4096
BATCHES, MICRO_BATCH, SEQ_LEN = 100, 16, 256


def write_corpus(folder: Path, words: int, seed: int = 0) -> None:
    """Documents of Zipf-distributed pseudo-words in three domains, about `words` words in all."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = np.random.default_rng(seed)
    letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
    lexicon = np.array(["".join(rng.choice(letters, rng.integers(2, 9))) for _ in range(20_000)])
    folder.mkdir(parents=True)
    per_file = words // FILES
    for f in range(FILES):
        docs, domains, left = [], [], per_file
        while left > 0:
            n = int(min(left, rng.integers(100, 1500)))
            ids = np.minimum(rng.zipf(1.2, n), len(lexicon)) - 1
            docs.append(" ".join(lexicon[ids]))
            domains.append(("web", "code", "books")[len(docs) % 3])
            left -= n
        pq.write_table(pa.table({"text": docs, "domain": domains}), folder / f"part-{f:03d}.parquet")


def tree_rss_mb(root) -> float:
    import psutil

    total = 0
    for p in [root, *root.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.NoSuchProcess:
            pass
    return total / 2**20


class PeakRSS:
    """Samples the RSS of this process and of its whole process tree every 0.1 s."""

    def __init__(self):
        import psutil

        self.me = psutil.Process()
        self.peak_self = self.peak_tree = 0.0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak_self = max(self.peak_self, self.me.memory_info().rss / 2**20)
            self.peak_tree = max(self.peak_tree, tree_rss_mb(self.me))
            time.sleep(0.1)

    def __enter__(self) -> "PeakRSS":
        self._thread.start()
        return self

    def __exit__(self, *_) -> None:
        self._stop.set()
        self._thread.join()


def spec_for(corpus: Path):
    from moe_data.spec import DataSpec

    return DataSpec(f"file:{corpus}/*.parquet", VOCAB, tokenizer_sample_chars=5_000_000)


def child_prepare(corpus: Path, cache: Path, cpus: int) -> dict:
    """Preparation in this process, with a Ray of `cpus` CPUs (the BPE is already in the cache)."""
    import ray

    from moe_data.prepare import load_prepared, prepare

    ray.init(address="local", num_cpus=cpus, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        with PeakRSS() as rss:
            began = time.perf_counter()
            folder = prepare(spec_for(corpus), cache)
            seconds = time.perf_counter() - began
        data = load_prepared(folder)
        tokens = sum(data.split(s).num_tokens for s in ("train", "validation", "test"))
        return {"cpus": cpus, "tokens": tokens, "seconds": round(seconds, 2),
                "tokens_per_s": round(tokens / seconds), "peak_rss_driver_mb": round(rss.peak_self, 1),
                "peak_rss_tree_mb": round(rss.peak_tree, 1), "folder": str(folder)}
    finally:
        ray.shutdown()


def child_tokenizer(corpus: Path, cache: Path) -> dict:
    from moe_data.ray_prepare import training_sample
    from moe_data.sources import open_splits
    from moe_data.tokenizer import train_or_load_tokenizer

    spec = spec_for(corpus)
    began = time.perf_counter()
    train_or_load_tokenizer(training_sample(spec, open_splits(spec)), VOCAB, cache)
    return {"bpe_seconds": round(time.perf_counter() - began, 2)}


def child_read(folder: Path) -> dict:
    """A worker's view: memory-map the shards, draw 100 training batches, report this process's RSS."""
    import psutil
    import torch

    from moe_data.prepare import load_prepared

    me = psutil.Process()
    before = me.memory_info().rss / 2**20
    data = load_prepared(folder)
    gen = torch.Generator().manual_seed(0)
    for _ in range(BATCHES):
        data.sample("train", MICRO_BATCH, gen, SEQ_LEN)
    after = me.memory_info().rss / 2**20
    return {"rss_before_mb": round(before, 1), "rss_after_100_batches_mb": round(after, 1),
            "rss_growth_mb": round(after - before, 1), "train_tokens": data.split("train").num_tokens}


def run_child(*args: str) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", *args], capture_output=True, text=True, cwd=REPO)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", type=float, nargs="+", default=[10e6, 50e6])
    parser.add_argument("--out")
    parser.add_argument("--child", nargs="+")
    args = parser.parse_args()
    if args.child:
        kind, *rest = args.child
        result = {"prepare": lambda: child_prepare(Path(rest[0]), Path(rest[1]), int(rest[2])),
                  "tokenizer": lambda: child_tokenizer(Path(rest[0]), Path(rest[1])),
                  "read": lambda: child_read(Path(rest[0]))}[kind]()
        print(json.dumps(result))
        return
    import os

    report: dict = {"machine": {"cpus": os.cpu_count()}, "sizes": {}}
    with tempfile.TemporaryDirectory(prefix="moelab-bench-data-") as tmp:
        for target in args.tokens:
            label = f"{target / 1e6:g}M"
            corpus, cache = Path(tmp) / f"corpus-{label}", Path(tmp) / f"cache-{label}"
            began = time.perf_counter()
            write_corpus(corpus, int(target / 1.15))  # ~1.17 tokens per pseudo-word under this BPE
            size = {"corpus_mb": round(sum(p.stat().st_size for p in corpus.iterdir()) / 2**20, 1),
                    "write_seconds": round(time.perf_counter() - began, 1),
                    **run_child("tokenizer", str(corpus), str(cache))}
            for cpus in (1, 2):
                prepared = run_child("prepare", str(corpus), str(cache), str(cpus))
                size[f"prepare_{cpus}cpu"] = prepared
                if cpus == 2:
                    size["worker"] = run_child("read", prepared["folder"])
                shutil.rmtree(prepared.pop("folder"))
            report["sizes"][label] = size
            shutil.rmtree(corpus)
    small, large = (report["sizes"][f"{t / 1e6:g}M"] for t in (args.tokens[0], args.tokens[-1]))
    report["ratios"] = {
        "prepare_tokens_per_s_2cpu_over_1cpu": {
            label: round(s["prepare_2cpu"]["tokens_per_s"] / s["prepare_1cpu"]["tokens_per_s"], 2)
            for label, s in report["sizes"].items()},
        "corpus_tokens_large_over_small": round(large["prepare_2cpu"]["tokens"] / small["prepare_2cpu"]["tokens"], 2),
        "prepare_peak_rss_driver_large_over_small": round(
            large["prepare_2cpu"]["peak_rss_driver_mb"] / small["prepare_2cpu"]["peak_rss_driver_mb"], 2),
        "prepare_peak_rss_tree_large_over_small": round(
            large["prepare_2cpu"]["peak_rss_tree_mb"] / small["prepare_2cpu"]["peak_rss_tree_mb"], 2),
        "worker_rss_large_over_small": round(
            large["worker"]["rss_after_100_batches_mb"] / small["worker"]["rss_after_100_batches_mb"], 2),
    }
    emit(report, args.out)


if __name__ == "__main__":
    main()
