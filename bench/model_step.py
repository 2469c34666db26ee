"""Whole-model training step (forward + backward + AdamW) of a Mixtral-style GPT, MoE backends and routers against a
dense model of equal active FLOPs, timed round-robin in one run: tokens/s, MFU, peak memory.

MFU = model FLOPs per token (moe_models/cost.py: 6 x non-expert matmul parameters + attention + the experts each
token actually used, measured on the timed batch) x tokens/s / the device's peak, measured in the same run as the
best of a few large matmuls of the same dtype (workflows/cell/cost_metrics.py, what cells use too).

  python bench/model_step.py --out bench/results/model_step_h100.json      # GPU: the anchors' shape, bf16
  python bench/model_step.py --layers 2 --d-model 128 --expert-hidden 512 --batch 2 --seq 256   # a CPU smoke run
  python bench/model_step.py --eager-and-compiled --only dense topk/grouped top_p_max4/grouped   # compile's gain
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench.moe_layer import (  # noqa: E402
    device_name,
    emit,
    interleaved_medians,
    kernel_ms,
    print_profile,
)
from moe_models.cost import expert_forward_flops_per_route, training_flops_per_token  # noqa: E402
from moe_models.models.gpt import GPT, GPTOptions  # noqa: E402
from moe_models.moe_ffn import MoEFeedForward  # noqa: E402
from moe_models.routers import ROUTERS  # noqa: E402
from moe_models.spec import DENSE, RoutingSpec  # noqa: E402
from workflows.cell.cost_metrics import measure_peak_tflops  # noqa: E402

VOCAB = 32000


def contenders(k: int, backends: list[str]) -> dict[str, tuple[str, RoutingSpec]]:
    """name -> (dispatch backend, routing). top-p's p is chosen so a near-uniform router picks about k experts."""
    out = {"dense": ("grouped", RoutingSpec(DENSE, dense_active_experts=k))}
    for backend in backends:
        out[f"topk/{backend}"] = (backend, RoutingSpec("topk", ROUTERS.get("topk").Options(k=k)))
    out["top_p/grouped"] = ("grouped", RoutingSpec("top_p", ROUTERS.get("top_p").Options(p=0.25)))
    # capped at 4 experts per token, the plan keeps filler rows instead of reading its route count (route_plan.py)
    out["top_p_max4/grouped"] = ("grouped", RoutingSpec("top_p", ROUTERS.get("top_p").Options(p=0.25, max_k=4)))
    out["hash/grouped"] = ("grouped", RoutingSpec("hash", ROUTERS.get("hash").Options(k=k)))
    return out


def experts_flops_per_token(model: GPT, ids: torch.Tensor) -> float:
    """Served routes x FLOPs per route over all MoE layers, from the routing of this very batch (eval sums)."""
    model.eval()
    with torch.no_grad():
        out = model(ids, ids)
    model.train()
    return sum(float(aux.sums["kept_routes"]) / ids.numel() * expert_forward_flops_per_route(layer)
               for layer, aux in zip((m for m in model.modules() if isinstance(m, MoEFeedForward)), out.moe.values()))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--d-model", type=int, default=1024)
    p.add_argument("--heads", type=int, default=16)
    p.add_argument("--experts", type=int, default=8)
    p.add_argument("--expert-hidden", type=int, default=4096)
    p.add_argument("--k", type=int, default=2)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--seq", type=int, default=1024)
    p.add_argument("--backends", nargs="+", default=["grouped", "deepspeed"])
    p.add_argument("--only", nargs="+", help="contender names to run (default: all)")
    p.add_argument("--compile", action="store_true", help="torch.compile each model")
    p.add_argument("--eager-and-compiled", action="store_true",
                   help="every contender twice in one rotation: eager, and torch.compile'd (name+compiled)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--profile", action="store_true", help="print each contender's top kernels (stderr)")
    p.add_argument("--out")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, time nothing")
    args = p.parse_args()
    if args.dry_run:  # bench/gpu_check.sh --dry-run: a typo in the GPU call fails here, on CPU
        names = list(contenders(args.k, args.backends))
        if unknown := [n for n in args.only or [] if n not in names]:
            raise SystemExit(f"model_step: unknown contenders {unknown}; known: {names}")
        emit({"benchmark": "model_step", "dry_run": True, "device": args.device, "contenders": args.only or names,
              "eager_and_compiled": args.eager_and_compiled,
              "shape": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "experts", "expert_hidden", "k",
                                                        "batch", "seq")}}, args.out)
        return
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    torch.manual_seed(0)
    ids = torch.randint(VOCAB, (args.batch, args.seq), device=device)
    tokens = ids.numel()
    steps, rows = {}, {}
    variants = [False, True] if args.eager_and_compiled else [args.compile]
    runs = [(name, spec, compiled) for name, spec in contenders(args.k, args.backends).items()
            if not args.only or name in args.only for compiled in variants]
    for base_name, (backend, routing), compiled in runs:
        name = f"{base_name}+compiled" if compiled and args.eager_and_compiled else base_name
        opts = GPTOptions(d_model=args.d_model, n_heads=args.heads, num_experts=args.experts,
                          expert_hidden=args.expert_hidden, n_layers=args.layers, dispatch=backend)
        model = GPT(opts, routing, VOCAB, args.seq, seed=0).to(device, dtype)
        expert_flops = experts_flops_per_token(model, ids) if not routing.is_dense else 0.0
        flops = training_flops_per_token(model, args.seq, expert_flops)
        runner = torch.compile(model) if compiled else model
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-5, fused=device == "cuda")

        def step(runner=runner, optimizer=optimizer):
            optimizer.zero_grad(set_to_none=True)
            runner(ids, ids).loss.backward()
            optimizer.step()

        steps[name] = step
        rows[name] = {"name": name, "backend": backend, "router": routing.router, "compiled": compiled,
                      "params_m": round(sum(p.numel() for p in model.parameters()) / 1e6, 1),
                      "experts_per_token": round(expert_flops / (4 * args.d_model * args.expert_hidden * args.layers),
                                                 3),
                      "train_gflops_per_token": round(flops / 1e9, 3)}
    peak = measure_peak_tflops(torch.device(device), dtype)
    ms = interleaved_medians(steps, device, args.warmup, args.repeats)
    if args.profile:
        print_profile(steps, device, rows=25)
    for name, step in steps.items():
        if device == "cuda":
            torch.cuda.reset_peak_memory_stats()
            step()
            rows[name]["peak_memory_gb"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
            rows[name]["kernel_ms"] = round(kernel_ms(step, steps=3), 2)  # device busy time; step_ms - this = idle
        tokens_per_s = tokens / (ms[name] / 1e3)
        rows[name].update(step_ms=round(ms[name], 2), tokens_per_s=round(tokens_per_s),
                          mfu=round(rows[name]["train_gflops_per_token"] * 1e9 * tokens_per_s / (peak * 1e12), 4))
        if "dense" in ms:
            rows[name]["step_vs_dense"] = round(ms[name] / ms["dense"], 3)
    report = {"benchmark": "model_step", "device": device_name(device), "dtype": str(dtype), "torch": torch.__version__,
              "peak_tflops_measured": round(peak, 1), "compile": args.compile or args.eager_and_compiled,
              "shape": {k: getattr(args, k) for k in ("layers", "d_model", "heads", "experts", "expert_hidden", "k",
                                                        "batch", "seq")},
              "results": list(rows.values())}
    emit(report, args.out)


if __name__ == "__main__":
    main()
