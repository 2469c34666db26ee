"""A cell's cost metrics: MFU arithmetic, the measured peak, and the router latency share's hooks."""
import pytest
import torch

from moe_models.models.gpt import GPT, GPTOptions
from moe_models.routers import ROUTERS
from moe_models.spec import DENSE, RoutingSpec
from workflows.cell.cost_metrics import cost_metrics, measure_peak_tflops, router_latency_share


def gpt(routing):
    return GPT(GPTOptions(d_model=32, n_heads=2, num_experts=4, expert_hidden=64, n_layers=2), routing, 60, 16, 0)


def test_mfu_is_achieved_flops_over_the_peak():
    model = gpt(RoutingSpec(DENSE, dense_active_experts=2))
    m = cost_metrics(model, 16, tokens_per_s_per_device=1000.0, expert_flops_per_token=0.0, peak_tflops=2.0,
                     step_seconds=0.5)
    assert m["summary/tflops_per_device"] == pytest.approx(m["summary/train_gflops_per_token"] * 1e9 * 1000 / 1e12)
    assert m["summary/mfu"] == pytest.approx(m["summary/tflops_per_device"] / 2.0)
    assert m["summary/step_seconds"] == 0.5


def test_measured_cpu_peak_is_a_plausible_matmul_rate():
    peak = measure_peak_tflops(torch.device("cpu"), torch.float32)
    assert 1e-3 < peak < 10  # between 1 GFLOP/s and 10 TFLOP/s on any CPU


def test_router_share_is_a_fraction_and_leaves_no_hooks_behind():
    model = gpt(RoutingSpec("mlp", ROUTERS.get("mlp").Options(k=2))).eval()
    ids = torch.randint(60, (2, 16))
    share = router_latency_share(model, lambda: model(ids, ids))
    assert 0 < share < 1
    assert all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())
    assert router_latency_share(gpt(RoutingSpec(DENSE)), lambda: None) is None
