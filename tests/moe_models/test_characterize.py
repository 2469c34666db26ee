"""The router characterization table covers the registry and reports consistent statistics."""
import json

import pytest

from moe_models.characterize import profile_all
from moe_models.routers import ROUTERS
from workflows.driver.cli import main


def test_profiles_cover_every_router_with_consistent_values():
    profiles = {p.router: p for p in profile_all(tokens=256, d_model=32, num_experts=4)}
    assert set(profiles) == set(ROUTERS.names())
    assert profiles["hash"].parameters == 0 and profiles["reference"].parameters == 0
    assert profiles["topk"].parameters == 32 * 4  # one linear scorer, no bias
    assert profiles["mlp"].parameters > profiles["topk"].parameters
    assert profiles["hash"].entropy == 0 and profiles["hash"].mean_topk_prob == pytest.approx(1.0)
    for p in profiles.values():
        assert p.latency_ms > 0 and 0 <= p.mean_topk_prob <= 1 + 1e-6 and p.experts_per_token >= 1


def test_routers_command_prints_json(capsys):
    assert main(["routers", "--format", "json", "--tokens", "128", "--d-model", "16", "--experts", "4"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert {r["router"] for r in rows} == set(ROUTERS.names())


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
