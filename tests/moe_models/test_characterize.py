"""The router characterization table covers the registry and reports consistent statistics."""
import json

import pytest

from moe_models.characterize import MODEL_ROUTING, profile_all, router_cases
from moe_models.routers import ROUTERS
from workflows.driver.cli import main


def test_profiles_cover_every_router_with_consistent_values():
    profiles = {p.router: p for p in profile_all(tokens=256, d_model=32, num_experts=4)}
    assert set(profiles) == set(ROUTERS.names()) | {f"topk:{m}" for m in MODEL_ROUTING}
    assert profiles["hash"].parameters == 0 and profiles["reference"].parameters == 0
    assert profiles["topk"].parameters == 32 * 4  # one linear scorer, no bias
    assert profiles["mlp"].parameters > profiles["topk"].parameters
    assert profiles["hash"].entropy == 0 and profiles["hash"].mean_topk_prob == pytest.approx(1.0)
    for p in profiles.values():
        assert p.latency_ms > 0 and 0 <= p.mean_topk_prob <= 1 + 1e-6 and p.experts_per_token >= 1
    assert profiles["topk:gpt_oss"].parameters == 32 * 4 + 4  # the learned logit bias
    assert profiles["topk:deepseek_v3"].experts_per_token == 2
    assert 1 <= profiles["topk:null_experts"].experts_per_token < 2  # a null route leaves a token fewer experts


def test_a_model_routing_that_does_not_fit_the_layer_is_left_out():
    assert "topk:deepseek_v3" in router_cases(8) and "topk:deepseek_v3" not in router_cases(6)  # 4 groups
    assert not any(case.startswith("topk:") for case in router_cases(2))  # k=2 of 2 experts selects nothing


def test_routers_command_prints_json(capsys):
    assert main(["routers", "--format", "json", "--tokens", "128", "--d-model", "16", "--experts", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["router"] for r in rows} == set(router_cases(4))


def test_routers_are_characterized_on_a_pretrained_encoders_hidden_states(capsys):
    """all-MiniLM-L6-v2 (bundled offline) over the built-in domains: 384-wide states, three domains alternating."""
    import json

    from workflows.driver.cli import main
    from workflows.driver.encoder_states import encoder_hidden_states

    x, ids, dom, vocab, title = encoder_hidden_states("builtin:all-MiniLM-L6-v2", 600)
    assert x.shape == (600, 384) and ids.shape == dom.shape == (600,) and set(dom.tolist()) == {0, 1, 2}
    assert vocab > 30_000 and title == "pretrained: builtin:all-MiniLM-L6-v2" and x.std() > 0.05
    assert main(["routers", "--hidden-states", "builtin:all-MiniLM-L6-v2", "--tokens", "600", "--experts", "8",
                 "--format", "json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    pretrained = {r["router"]: r for r in rows if r["hidden_states"].startswith("pretrained")}
    assert set(pretrained) == {r["router"] for r in rows if r["hidden_states"] == "random"}
    assert pretrained["topk"]["parameters"] == 384 * 8 and pretrained["hash"]["entropy"] == 0.0
    assert main(["routers", "--hidden-states", "./no/such/encoder", "--tokens", "600"]) == 2
    assert "--hidden-states './no/such/encoder'" in capsys.readouterr().err


def test_pooled_profiles_give_means_t_intervals_and_latency_against_linear_per_seed():
    from scipy import stats

    from moe_models.characterize import RouterProfile, pool_profiles

    entropy = {0: 1.0, 1: 1.2, 2: 1.4}
    profiles = [RouterProfile("mlp", "random", s, 10, 3.0 * (s + 1), entropy[s], 0.5, 1.0, 0.1) for s in range(3)]
    profiles += [RouterProfile("topk", "random", s, 4, 1.0 * (s + 1), 2.0, 0.4, 1.0, 0.2) for s in range(3)]
    rows = {r["router"]: r for r in pool_profiles(profiles)}
    mlp = rows["mlp"]
    assert mlp["seeds"] == 3 and mlp["entropy"] == pytest.approx(1.2)
    expected = stats.t.interval(0.95, 2, loc=1.2, scale=stats.sem([1.0, 1.2, 1.4]))
    assert mlp["entropy_ci"] == pytest.approx(expected[1] - 1.2)
    assert mlp["latency_vs_linear"] == pytest.approx(3.0)  # each seed's ratio is 3
    assert rows["topk"]["latency_vs_linear"] == pytest.approx(1.0) and rows["topk"]["load_cv_ci"] == pytest.approx(0)
    single = pool_profiles(profiles[:1])[0]
    assert single["entropy_ci"] is None and single["latency_vs_linear"] is None  # no linear router to compare to


def test_routers_command_pools_seeds_into_the_table(capsys):
    assert main(["routers", "--tokens", "128", "--d-model", "16", "--experts", "4", "--seeds", "3"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[0].startswith("| router | hidden states | seeds |") and len(table) == 2 + len(router_cases(4))
    hash_row = next(line for line in table if line.startswith("| hash |"))
    assert "| 3 | 0 |" in hash_row and "0.000 ± 0.000" in hash_row  # three seeds, no parameters, zero entropy


def test_each_router_is_timed_serving_a_small_decoder_where_a_decoder_can_serve_it():
    from moe_models.characterize import pool_profiles

    rows = {r["router"]: r for r in pool_profiles(profile_all(tokens=256, d_model=32, num_experts=4))}
    assert rows["topk"]["decode_ms_per_token"] > 0 and rows["hash"]["decode_ms_per_token"] > 0
    assert rows["reference"]["decode_ms_per_token"] is None  # it reads domain labels, which generated tokens lack
    assert rows["expert_choice"]["decode_ms_per_token"] is None  # non-causal: no decoder serves it
