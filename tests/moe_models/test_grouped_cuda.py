"""The grouped backend's CUDA paths (torch's grouped GEMM in bf16, the padded path otherwise). These need a GPU and
run where one exists (the device machine); on CPU-only CI they are skipped — a GPU cannot exist there."""
import copy

import pytest
import torch

from moe_models.experts import ACTIVATIONS
from moe_models.moe_ffn import MoEFeedForward, moe_forward
from tests.tiny_layers import tiny_moe

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

D, F, E, V = 64, 128, 8, 100
# top_p over all 8 experts reads its route count; with max_k=4 it plans filler rows instead (route_plan.py).
CASES = [("topk", {"k": 2}), ("top_p", {"p": 0.5}), ("top_p", {"p": 0.5, "max_k": 4}),
         ("top_any", {"init_threshold": -0.05}), ("hash", {"k": 2}), ("expert_choice", {"capacity": 1.5})]


def layer_on(backend: str, router: str, options: dict, capacity_factor=None, activation="gelu") -> MoEFeedForward:
    return tiny_moe(router, options, d_model=D, expert_hidden=F, num_experts=E, vocab_size=V, backend=backend,
                    activation=activation, capacity_factor=capacity_factor)


def run(layer, x, ids):
    x = x.clone().requires_grad_()
    y, _ = moe_forward(layer, x, ids)
    y.float().square().sum().backward()
    return y.float(), x.grad.float(), layer.dispatch.experts.up_weight_EFD.grad.float()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16-grouped", "fp16-padded"])
@pytest.mark.parametrize("router,options", CASES, ids=[f"{r}{o}" for r, o in CASES])
def test_half_precision_cuda_paths_match_the_fp32_cpu_path(router, options, dtype, activation):
    # Both sides start from the same half-representable weights and inputs, so they route alike.
    cpu = layer_on("grouped", router, options, activation=activation).eval().to(dtype).float()
    gpu = copy.deepcopy(cpu).cuda().to(dtype)
    x, ids = torch.randn(4, 256, D).to(dtype).float(), torch.randint(V, (4, 256))
    ref = run(cpu, x, ids)
    got = run(gpu, x.cuda().to(dtype), ids.cuda())
    for name, a, b in zip(("output", "input grad", "expert grad"), got, ref):
        scale = b.abs().max()
        assert (a.cpu() - b).abs().max() <= 0.02 * scale, name  # bf16: ~3 significant digits (fp16: ~4)


@pytest.mark.parametrize("capacity_factor", [None, 0.75])
def test_padded_cuda_path_matches_deepspeed_in_fp32(capacity_factor):
    ds = layer_on("deepspeed", "topk", {"k": 2}, capacity_factor).eval().cuda()
    grouped = layer_on("grouped", "topk", {"k": 2}, capacity_factor).eval().cuda()
    experts = list(ds.dispatch.moe.deepspeed_moe.experts.deepspeed_experts)
    with torch.no_grad():
        stacked = grouped.dispatch.experts
        stacked.up_weight_EFD.copy_(torch.stack([e.up.weight for e in experts]))
        stacked.up_bias_EF.copy_(torch.stack([e.up.bias for e in experts]))
        stacked.down_weight_EDF.copy_(torch.stack([e.down.weight for e in experts]))
        stacked.down_bias_ED.copy_(torch.stack([e.down.bias for e in experts]))
    x, ids = torch.randn(2, 128, D, device="cuda"), torch.randint(V, (2, 128), device="cuda")
    torch.backends.cuda.matmul.allow_tf32 = False
    ya, _ = ds(x, ids)
    yb, _ = grouped(x, ids)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("router,options", [("topk", {"k": 2}), ("top_p", {"p": 0.5, "max_k": 4})],
                         ids=["topk", "top_p-filler"])
def test_grouped_training_step_never_synchronizes_with_the_host(router, options, activation):
    layer = layer_on("grouped", router, options, activation=activation).train().cuda().bfloat16()
    x, ids = torch.randn(4, 256, D, device="cuda", dtype=torch.bfloat16), torch.randint(V, (4, 256), device="cuda")
    run(layer, x, ids)  # warm-up: lazy initialisation may synchronise once
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        run(layer, x, ids)
    finally:
        torch.cuda.set_sync_debug_mode("default")
