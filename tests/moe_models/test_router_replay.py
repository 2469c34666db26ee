"""Router replay: a run that replays a recording routes every token of every block as recorded, bit for bit, while
its own gates weight the experts and receive gradients (Megatron-Core's router_replay)."""
import pytest
import torch

from moe_models.models import MODELS
from moe_models.router_replay import RouterReplay, attach
from moe_models.routers.options import TopKOptions
from moe_models.routers.topk import TopKRouter
from moe_models.spec import RoutingSpec

V = 60
OPTIONS = {"d_model": 32, "n_layers": 2, "n_heads": 2, "num_experts": 4, "expert_hidden": 32}


def gpt(seed: int, router_options: dict):
    family = MODELS.get("gpt")
    return family.build(family.Options(**OPTIONS), RoutingSpec("topk", TopKOptions(**router_options), {}), V, 16,
                        seed)


def routed(model) -> dict[int, list[torch.Tensor]]:
    """Each block's (T, k) expert ids, forward by forward, as its router handed them to the layer."""
    captured: dict[int, list[torch.Tensor]] = {}
    for module in model.modules():
        if isinstance(module, TopKRouter):
            module.register_forward_hook(
                lambda mod, args, out: captured.setdefault(mod.ctx.layer_index, []).append(out.expert_ids_TK))
    return captured


@pytest.mark.parametrize("router_options", [{"k": 2}, {"k": 2, "score": "sigmoid", "renormalize": True}])
def test_a_replayed_run_routes_as_recorded_with_live_gates(tmp_path, router_options):
    torch.manual_seed(0)
    batches = [torch.randint(V, (2, 16)) for _ in range(3)]
    recorder = gpt(0, router_options)
    replay = RouterReplay.recording()
    assert attach(recorder, replay) == 2
    for ids in batches:
        recorder(ids, ids)
    replay.save(tmp_path / "routes.pt")

    other = gpt(1, router_options)  # other weights: its own router chooses otherwise
    seen = routed(other)
    other(batches[0], batches[0])
    assert any(not torch.equal(seen[i][0], replay.choices[i][0]) for i in seen)
    seen.clear()
    attach(other, RouterReplay.replaying(tmp_path / "routes.pt"))
    for ids in batches:
        other.zero_grad()
        other(ids, ids).lm_loss.backward()
        for router in (m for m in other.modules() if isinstance(m, TopKRouter)):
            assert router.proj.weight.grad is not None and router.proj.weight.grad.abs().sum() > 0  # live gates
    for layer, forwards in seen.items():
        assert len(forwards) == len(batches)
        assert all(torch.equal(ids, recorded) for ids, recorded in zip(forwards, replay.choices[layer]))


def test_the_replayed_routes_are_the_ones_the_layer_dispatches():
    torch.manual_seed(1)
    ids = torch.randint(V, (2, 16))
    recorder, replay = gpt(0, {"k": 2}), RouterReplay.recording()
    attach(recorder, replay)
    recorded_out = recorder.eval()(ids, ids)
    other = gpt(2, {"k": 2}).eval()
    attach(other, RouterReplay.replaying(replay))
    out = other(ids, ids)
    for layer in recorded_out.moe:
        recorded_mask = recorded_out.moe[layer].expert_mask_TE
        assert torch.equal(out.moe[layer].expert_mask_TE, recorded_mask)  # the experts each token was sent to


def test_a_recording_that_does_not_match_the_run_is_refused():
    ids = torch.randint(V, (2, 16))
    recorder, replay = gpt(0, {"k": 2}), RouterReplay.recording()
    attach(recorder, replay)
    recorder(ids, ids)
    other = gpt(0, {"k": 2})
    attach(other, RouterReplay.replaying(replay))
    other(ids, ids)
    with pytest.raises(IndexError, match="block 0 has 1 recorded forwards; forward 2 asked for one more"):
        other(ids, ids)
    attach(other, RouterReplay.replaying(replay))
    with pytest.raises(ValueError, match=r"routes \(64, 2\) \(tokens, k\); the recording has \(32, 2\)"):
        other(torch.randint(V, (4, 16)), torch.randint(V, (4, 16)))
