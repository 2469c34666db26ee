"""Peak memory of loading a swapped MoE checkpoint per expert-parallel rank: a bf16 Qwen2-MoE whose experts dominate
its size (about 400 MB of experts, saved in shards), loaded by HFCausalLM on ep_size 1, 2 and 4 gloo ranks, each
rank a fresh process. `sharded`: each rank reads only its experts (moe_models/pretrained/expert_sharded_load.py);
`whole`: transformers' from_pretrained loads every expert on every rank and router swap keeps the rank's share (what
moelab did before). A rank's load peak (its peak RSS during the load, less its RSS before) should fall with ep_size for
`sharded` and stay at the whole checkpoint for `whole`.

  python bench/checkpoint_load_rss.py --out bench/results/checkpoint_load_rss_cpu2.json
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
from bench.moe_layer import emit  # noqa: E402

SHAPE = dict(vocab_size=1024, hidden_size=256, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=512, moe_intermediate_size=4096, shared_expert_intermediate_size=512, num_experts=16,
             num_experts_per_tok=2, max_position_embeddings=256, tie_word_embeddings=False)


def write_checkpoint(folder: Path) -> int:
    """The checkpoint, in bf16 shards of 50 MB; returns its experts' bytes."""
    import torch
    from transformers import AutoModelForCausalLM, Qwen2MoeConfig

    model = AutoModelForCausalLM.from_config(Qwen2MoeConfig(**SHAPE), dtype=torch.bfloat16)
    model.save_pretrained(folder, max_shard_size="50MB")
    return sum(p.numel() * p.element_size() for n, p in model.named_parameters() if ".experts." in n)


def rss_mb() -> float:
    import psutil

    return psutil.Process().memory_info().rss / 2**20


def rank_main(folder: str, mode: str, rank: int, world: int, port: int, out: str) -> None:
    """One rank: join the gloo group, load the checkpoint at ep_size = world, write its load peak."""
    import torch
    import torch.distributed as dist

    import moe_models.models.hf as hf
    from workflows.cell.evaluation import peak_memory_mb, reset_peak_memory  # a cell's own peak measure (VmHWM)
    from moe_models.models.options import HFOptions
    from moe_models.routers import ROUTERS
    from moe_models.spec import RoutingSpec

    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    if mode == "whole":
        hf.load_without_experts = lambda *_: None  # from_pretrained, then router swap slices
    routing = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2))
    import deepspeed.moe.layer  # noqa: F401 — what loading imports, imported first: the peak is the load's own
    import transformers.models.qwen2_moe.modeling_qwen2_moe  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401

    reset_peak_memory()  # the peak measured next is the load's, not that of the imports before it
    before = rss_mb()
    model = hf.HFCausalLM(HFOptions(pretrained=folder, init_router="pretrained", ep_size=world), routing,
                          SHAPE["vocab_size"], 64, seed=0, dtype=torch.bfloat16)
    peak = peak_memory_mb()
    held = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    Path(out).write_text(json.dumps({"rank": rank, "load_peak_mb": round(peak - before, 1),
                                     "rss_after_mb": round(rss_mb() - before, 1), "params_held_mb": round(held, 1),
                                     "expert_share": model.checkpoint_expert_share}))
    dist.destroy_process_group()


def measure(folder: Path, mode: str, world: int, port: int, tmp: Path) -> dict:
    outs = [tmp / f"{mode}-{world}-{r}.json" for r in range(world)]
    procs = [subprocess.Popen([sys.executable, __file__, "--rank", str(r), "--world", str(world), "--mode", mode,
                               "--port", str(port), "--folder", str(folder), "--rank-out", str(outs[r])], cwd=REPO)
             for r in range(world)]
    try:
        codes = [p.wait(timeout=600) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    if any(codes):
        raise RuntimeError(f"{mode} ep_size {world}: exit codes {codes}")
    ranks = [json.loads(o.read_text()) for o in outs]
    return {"ep_size": world, "max_rank_load_peak_mb": max(r["load_peak_mb"] for r in ranks), "ranks": ranks}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out")
    parser.add_argument("--ep-sizes", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--rank", type=int)
    parser.add_argument("--world", type=int)
    parser.add_argument("--mode")
    parser.add_argument("--port", type=int)
    parser.add_argument("--folder")
    parser.add_argument("--rank-out")
    args = parser.parse_args()
    if args.rank is not None:
        rank_main(args.folder, args.mode, args.rank, args.world, args.port, args.rank_out)
        return
    with tempfile.TemporaryDirectory(prefix="moelab-bench-ckpt-") as tmp:
        folder = Path(tmp) / "qwen2-moe-bf16"
        expert_bytes = write_checkpoint(folder)
        results = {mode: [measure(folder, mode, world, 29600 + 10 * i + world, Path(tmp))
                          for i, world in enumerate(args.ep_sizes)] for mode in ("sharded", "whole")}
    first = {mode: runs[0]["max_rank_load_peak_mb"] for mode, runs in results.items()}
    emit({"checkpoint": {**SHAPE, "dtype": "bfloat16", "expert_mb": round(expert_bytes / 2**20, 1),
                         "shards": "50MB each"},
          **results,
          "load_peak_over_first_ep_size": {mode: {r["ep_size"]: round(r["max_rank_load_peak_mb"] / first[mode], 3)
                                                  for r in runs} for mode, runs in results.items()}},
         args.out)


if __name__ == "__main__":
    main()
