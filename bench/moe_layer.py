"""One MoE FFN layer forward+backward vs a dense FFN of the same active FLOPs (hidden k*F), measured side by side.

Prints JSON (and writes it with --out): per shape and dispatch backend, median times and the ratio MoE/dense.
Never asserted in tests; targets live in the issues.

  python bench/moe_layer.py                       # CPU shapes
  python bench/moe_layer.py --device cuda --dtype bf16 --out bench/results/moe_layer_h100.json
  python bench/moe_layer.py --device cuda --backends grouped --compile   # every contender torch.compile'd
"""
from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from moe_models.dispatch import DISPATCH_BACKENDS, DispatchSpec  # noqa: E402
from moe_models.experts import ACTIVATIONS, ExpertFFN, matmuls_per_token  # noqa: E402
from moe_models.moe_ffn import MoEFeedForward  # noqa: E402
from moe_models.routers import ROUTERS, RouterContext  # noqa: E402

CPU_SHAPES = [(4096, 256, 1024, 8, 2), (4096, 96, 384, 4, 2)]  # (T, d, f, E, k)
GPU_SHAPES = [(16384, 1024, 4096, 8, 2), (16384, 1024, 1024, 32, 4), (16384, 768, 3072, 4, 2), (8192, 96, 384, 4, 2)]


def device_name(device: str) -> str:
    if device == "cuda":
        return torch.cuda.get_device_name()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def timed_ms(fn, device: str) -> float:
    if device == "cuda":
        torch.cuda.synchronize()
    began = time.perf_counter()
    fn()
    if device == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - began) * 1e3


def interleaved_medians(steps: dict, device: str, warmup: int, repeats: int) -> dict[str, float]:
    """Median ms of each step, timed round-robin (dense, backend A, backend B, dense, ...) so that drift in clock or
    load hits every contender alike — the ratios are what the issue's targets are about."""
    for _ in range(warmup):
        for fn in steps.values():
            fn()
    times: dict[str, list[float]] = {name: [] for name in steps}
    for _ in range(repeats):
        for name, fn in steps.items():
            times[name].append(timed_ms(fn, device))
    return {name: statistics.median(t) for name, t in times.items()}


def fwd_bwd(module, x, ids=None):
    """A dense FFN (`ids` None) or an MoE layer, fed its token ids as its model would."""
    def step():
        if ids is not None:
            module.recorder.begin(ids)
        module(x).float().sum().backward()
    return step


def kernel_ms(fn, steps: int = 5) -> float:
    """Device time of the kernels one step launches (torch.profiler, CUDA): its cost when the host runs ahead, as it
    does inside a model with no host synchronisation — the wall time of a lone small op is mostly launch latency."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            fn()
        torch.cuda.synchronize()
    return sum(e.self_device_time_total for e in prof.key_averages()) / steps / 1e3


def print_profile(steps: dict, device: str, rows: int = 18) -> None:
    """Where each contender's time goes: the top kernels of 3 steps (stderr, so stdout stays JSON)."""
    activities = [torch.profiler.ProfilerActivity.CPU] + (
        [torch.profiler.ProfilerActivity.CUDA] if device == "cuda" else [])
    for name, fn in steps.items():
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(3):
                fn()
            if device == "cuda":
                torch.cuda.synchronize()
        key = "self_cuda_time_total" if device == "cuda" else "self_cpu_time_total"
        print(f"--- {name}\n{prof.key_averages().table(sort_by=key, row_limit=rows)}", file=sys.stderr)


def router_options(router: str, k: int) -> dict:
    """Options giving each router about k experts per token (top-p's p: k of E under a near-uniform router)."""
    if router in ("top_p",):
        return {"p": 0.25}
    if router == "entropy_adaptive":
        return {"max_k": k}
    if router == "expert_choice":
        return {"capacity": float(k)}
    if router in ("top_any", "reference"):
        return {}
    return {"k": k}


def router_fwd_bwd(router, x, ids):
    """The router alone: its decision's weights and probabilities back to x (what its MoE layer differentiates)."""
    x_TD, ids_T = x.view(-1, x.shape[-1]), ids.view(-1)

    def step():
        decision = router(x_TD, ids_T)
        loss = decision.weights_TK.sum() + decision.probs_TE.sum()
        if loss.requires_grad:
            loss.backward()
    return step


def bench_shape(shape, backends: list[str], router: str, device: str, dtype, warmup: int, repeats: int,
                profile: bool = False, compile: bool = False, activation: str = "gelu") -> list[dict]:
    T, d, f, E, k = shape
    torch.manual_seed(0)
    x = torch.randn(1, T, d, device=device, dtype=dtype, requires_grad=True)
    ids = torch.randint(32000, (1, T), device=device)

    def ready(module):  # on the device; compiled too with --compile (dense and MoE alike: a like-for-like ratio)
        module = module.to(device, dtype)
        return torch.compile(module) if compile else module

    steps = {"dense": fwd_bwd(ready(ExpertFFN(d, k * f, activation)), x)}
    cls = ROUTERS.get(router)
    opts = cls.Options(**router_options(router, k))
    ctx = RouterContext(d, E, 32000, 0, 0)
    for backend in backends:
        torch.manual_seed(1)  # the same router weights, hence the same routes, for every backend
        moe = MoEFeedForward(cls(ctx, opts), DISPATCH_BACKENDS.get(backend)(DispatchSpec(d, f, E, 1, None, "position",
                                                                                          activation)),
                             {})
        steps[backend] = fwd_bwd(ready(moe), x, ids)
    torch.manual_seed(1)
    steps["router"] = router_fwd_bwd(ready(cls(ctx, opts)), x, ids)
    ms = interleaved_medians(steps, device, warmup, repeats)
    if profile:
        print(f"=== shape {shape} router {router}", file=sys.stderr)
        print_profile(steps, device)
    gpu_ms = {name: kernel_ms(steps[name]) for name in [*backends, "router"]} if device == "cuda" else {}
    # the expert matmuls (two, SwiGLU three) of 2*T*d*kF flops forward each, backward twice that
    active_flops = 3 * (matmuls_per_token(activation) * 2 * T * d * k * f)
    return [{"T": T, "d": d, "f": f, "E": E, "k": k, "backend": backend, "router": router, "compiled": compile,
             "activation": activation,
             "dense_ms": round(ms["dense"], 3), "moe_ms": round(ms[backend], 3),
             "ratio_vs_dense": round(ms[backend] / ms["dense"], 3),
             **({"ratio_vs_deepspeed": round(ms[backend] / ms["deepspeed"], 3)} if "deepspeed" in ms else {}),
             "router_ms": round(ms["router"], 3), "router_share": round(ms["router"] / ms[backend], 3),
             **({"moe_kernel_ms": round(gpu_ms[backend], 3), "router_kernel_ms": round(gpu_ms["router"], 3),
                 "router_kernel_share": round(gpu_ms["router"] / gpu_ms[backend], 3)} if gpu_ms else {}),
             "dense_tflops": round(active_flops / ms["dense"] / 1e9, 3)} for backend in backends]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", choices=("fp32", "bf16", "fp16"), default=None)
    p.add_argument("--backends", nargs="+", default=DISPATCH_BACKENDS.names())
    p.add_argument("--routers", nargs="+", default=["topk"])
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--shapes", default=None, help="semicolon-separated T,d,f,E,k tuples")
    p.add_argument("--profile", action="store_true", help="print each contender's top kernels (torch.profiler)")
    p.add_argument("--compile", action="store_true", help="torch.compile every contender (dense, MoE, router)")
    p.add_argument("--activation", choices=ACTIVATIONS, default="gelu", help="expert (and dense twin) activation")
    p.add_argument("--out")
    p.add_argument("--dry-run", action="store_true", help="check the arguments, print the plan, time nothing")
    args = p.parse_args()
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}[args.dtype or ("bf16" if args.device == "cuda" else "fp32")]
    shapes = ([tuple(int(v) for v in s.split(",")) for s in args.shapes.split(";")] if args.shapes
              else GPU_SHAPES if args.device == "cuda" else CPU_SHAPES)
    if args.dry_run:  # bench/gpu_check.sh --dry-run: a typo in the GPU call fails here, on CPU
        unknown = [b for b in args.backends if b not in DISPATCH_BACKENDS.names()]
        unknown += [r for r in args.routers if r not in ROUTERS.names()]
        if unknown or any(len(s) != 5 for s in shapes):
            raise SystemExit(f"moe_layer: unknown {unknown} or a shape that is not T,d,f,E,k: {shapes}")
        emit({"benchmark": "moe_layer_fwd_bwd", "dry_run": True, "device": args.device, "dtype": str(dtype),
              "shapes": shapes, "backends": args.backends, "routers": args.routers, "compile": args.compile}, args.out)
        return
    if args.device == "cpu":
        torch.set_num_threads(torch.get_num_threads())
    results = [row for s in shapes for router in args.routers
               for row in bench_shape(s, args.backends, router, args.device, dtype, args.warmup, args.repeats,
                                      args.profile, args.compile, args.activation)]
    report = {"benchmark": "moe_layer_fwd_bwd", "device": device_name(args.device), "dtype": str(dtype),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "results": results}
    emit(report, args.out)


def emit(report: dict, out: str | None) -> None:
    """The report as JSON on stdout, and in `out` when given."""
    text = json.dumps(report, indent=2)
    print(text)
    if out:
        Path(out).write_text(text + "\n")


if __name__ == "__main__":
    main()
