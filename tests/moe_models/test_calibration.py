"""Matched compute by calibration: each dynamic router's knob, bisected on a trained router, reaches a target experts
per token within ±0.05; out-of-range targets are refused with the range the knob reaches."""
import math

import pytest
import torch

from moe_models.routers.calibration import Calibration, CalibrationError, Knob, calibrate, set_knob

TOKENS, D, E = 512, 8, 4


def trained_layer(router: str, options: dict):
    """A tiny MoE layer trained to send each of four token clusters to its own expert (through the layer's output),
    so its router is confident on some tokens and not on others, as a trained model's is."""
    from moe_models.moe_ffn import moe_forward
    from tests.tiny_layers import tiny_moe

    layer = tiny_moe(router, options, d_model=D, num_experts=E)
    gen = torch.Generator().manual_seed(0)
    centers = torch.randn(4, D, generator=gen) * 3
    cluster = torch.randint(0, 4, (TOKENS,), generator=gen)
    x = (centers[cluster] + 0.8 * torch.randn(TOKENS, D, generator=gen)).unsqueeze(0)
    target = torch.randn(4, D, generator=gen)[cluster].unsqueeze(0)
    optimizer = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(100):
        optimizer.zero_grad()
        y, _ = moe_forward(layer, x, torch.zeros(1, TOKENS, dtype=torch.long))
        ((y - target) ** 2).mean().backward()
        optimizer.step()
    return layer, x.reshape(-1, D)


def experts_per_token(layer, x_TD: torch.Tensor) -> float:
    with torch.no_grad():
        return layer.router(x_TD, torch.zeros(len(x_TD), dtype=torch.long)).experts_per_token_T.float().mean().item()


@pytest.mark.parametrize("router, options", [("top_p", {"p": 0.4}), ("top_any", {}),
                                             ("entropy_adaptive", {"min_k": 1, "max_k": 4})])
def test_calibration_reaches_its_target_experts_per_token_on_a_trained_router(router, options):
    layer, x = trained_layer(router, options)
    knob = layer.router.Options.calibration_knob
    start = experts_per_token(layer, x)

    def measure(value: float) -> float:
        assert set_knob(layer, knob.option, value) == 1
        return experts_per_token(layer, x)

    found = {target: calibrate(measure, knob, target) for target in (1.5, 2.0, 3.0)}
    for target, result in found.items():
        assert abs(result.experts_per_token - target) <= 0.05, (router, start, result)
        assert measure(result.value) == result.experts_per_token  # the value reproduces what was measured
        assert result.evaluations <= 40
    # More experts per token takes a higher p / entropy scale, or a lower top-any threshold.
    values = [found[t].value for t in (1.5, 2.0, 3.0)]
    assert values == sorted(values, reverse=not knob.more_experts_when_higher)


def test_a_target_the_knob_cannot_reach_names_the_range_it_reaches():
    layer, x = trained_layer("top_p", {"p": 0.4, "max_k": 2})  # at most 2 experts per token whatever p is

    def measure(value: float) -> float:
        set_knob(layer, "p", value)
        return experts_per_token(layer, x)

    with pytest.raises(CalibrationError, match=r"p in \[0.001, 1\] spends 1.000 to 2.000 experts per token; "
                                               r"the target 3 is outside"):
        calibrate(measure, layer.router.Options.calibration_knob, 3.0)


@pytest.mark.parametrize("log_scale", [False, True])
def test_bisection_finds_the_root_of_a_known_monotone_function(log_scale):
    """Decreasing in the knob (as top-any's threshold is): 4 - 3 * v / 10 on [0.1, 10] reaches 2.5 at v = 5."""
    knob = Knob("v", 0.1, 10.0, more_experts_when_higher=False, log_scale=log_scale)
    result = calibrate(lambda v: 4 - 3 * v / 10, knob, 2.5, tolerance=1e-6, max_evaluations=60)
    assert result == Calibration("v", pytest.approx(5.0, abs=1e-4), pytest.approx(2.5, abs=1e-6), 2.5,
                                 result.evaluations)
    assert result.gap == pytest.approx(0.0, abs=1e-6)


def test_entropy_scale_multiplies_the_normalized_entropy_before_the_clamp():
    from moe_models.routers.entropy_adaptive import adaptive_k

    probs = torch.tensor([[1.0, 0, 0, 0], [0.5, 0.5, 0, 0], [0.25] * 4, [0.6, 0.3, 0.1, 0.0]])
    normalized = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / math.log(4)  # 0, 0.5, 1, 0.648
    assert adaptive_k(probs, 1, 9, entropy_scale=1.0).tolist() == adaptive_k(probs, 1, 9).tolist()
    assert adaptive_k(probs, 1, 9, entropy_scale=1.5).tolist() == \
        (1 + 8 * (1.5 * normalized).clamp(max=1)).round().long().tolist() == [1, 7, 9, 9]


def test_set_knob_sets_only_routers_that_declare_that_knob():
    from tests.tiny_layers import tiny_moe

    top_p, topk = tiny_moe("top_p", {"p": 0.4}), tiny_moe("topk", {"k": 2})
    assert set_knob(top_p, "p", 0.7) == 1 and top_p.router.options.p == 0.7
    assert set_knob(topk, "p", 0.7) == 0 and not hasattr(topk.router.options, "p")
    assert set_knob(top_p, "threshold_offset", 1.0) == 0  # top-any's knob, not top-p's


def test_the_knob_read_back_is_the_mean_over_the_layers_that_hold_one():
    """A model trained at a target compute ends with a knob per layer (moe_models/routers/compute_target.py)."""
    from torch import nn

    from moe_models.routers.calibration import read_knob
    from tests.tiny_layers import tiny_moe

    model = nn.ModuleList([tiny_moe("top_p", {"p": 0.2}), tiny_moe("top_p", {"p": 0.4}), tiny_moe("topk", {"k": 2})])
    assert read_knob(model, "p") == pytest.approx(0.3)
    assert read_knob(model, "threshold_offset") is None
