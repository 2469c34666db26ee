"""Which blocks are MoE: every block (the default), the first k dense then MoE (DeepSeek-V3's
first_k_dense_replace), or a list, one entry per block (Megatron-Core's pattern). The layers' routing records keep
their block indices, so per-block analytics name the right block."""
import pytest
import torch
from pydantic import ValidationError

from moe_models.experts import ExpertFFN
from moe_models.models import MODELS
from moe_models.moe_ffn import MoEFeedForward
from moe_models.routers.options import TopKOptions
from moe_models.spec import RoutingSpec

V = 50
ROUTING = RoutingSpec("topk", TopKOptions(k=2), {"switch_lbl": 0.01})
SMALL = {"d_model": 16, "n_heads": 2, "num_experts": 4, "expert_hidden": 16}


def ffn_kinds(model) -> list[str]:
    return ["moe" if isinstance(m, MoEFeedForward) else "dense" for m in model.modules()
            if isinstance(m, MoEFeedForward) or (isinstance(m, ExpertFFN) and not _inside_moe(model, m))]


def _inside_moe(model, module) -> bool:
    return any(module in set(m.modules()) for m in model.modules() if isinstance(m, MoEFeedForward))


def build(family: str, **options):
    fam = MODELS.get(family)
    return fam.build(fam.Options(**SMALL, **options), ROUTING, V, 16, 0)


@pytest.mark.parametrize("family", ["gpt", "llama"])
@pytest.mark.parametrize("options,expected", [
    ({}, ["moe", "moe", "moe"]),
    ({"first_k_dense": 1}, ["dense", "moe", "moe"]),
    ({"moe_layer_pattern": [1, 0, 1]}, ["moe", "dense", "moe"]),
    ({"moe_every": 2, "first_k_dense": 2}, ["dense", "dense", "dense"]),  # block 2 was its only MoE block
])
def test_the_pattern_decides_each_blocks_ffn_and_records_keep_block_indices(family, options, expected):
    if expected.count("moe") == 0:
        with pytest.raises(ValidationError, match="no MoE block"):
            build(family, n_layers=3, **options)
        return
    model = build(family, n_layers=3, **options)
    assert ffn_kinds(model) == expected
    ids = torch.randint(V, (2, 8))
    out = model(ids, ids)
    assert sorted(out.moe) == [i for i, kind in enumerate(expected) if kind == "moe"]


def test_an_encoder_decoder_applies_the_pattern_to_each_stack():
    opts = {"d_model": 16, "n_heads": 2, "num_experts": 4, "expert_hidden": 16, "encoder_layers": 2,
            "decoder_layers": 2, "moe_layer_pattern": [0, 1]}
    fam = MODELS.get("seq2seq")
    model = fam.build(fam.Options(**opts), ROUTING, V, 16, 0)
    assert ffn_kinds(model).count("moe") == 2 and fam.Options(**opts).moe_blocks() == 2


def test_a_pattern_that_does_not_fit_the_stack_is_refused_naming_the_field():
    fam = MODELS.get("gpt")
    with pytest.raises(ValidationError, match="moe_layer_pattern: 2 entries for stacks of 3 blocks"):
        fam.Options(**SMALL, n_layers=3, moe_layer_pattern=[1, 0])
    with pytest.raises(ValidationError, match="leave moe_every and first_k_dense out"):
        fam.Options(**SMALL, n_layers=2, moe_layer_pattern=[1, 0], first_k_dense=1)


def test_a_block_may_have_a_router_of_its_own():
    """DeepSeek-V4 hash-routes its first layers: block 0 a hash router, the rest the cell's top-k."""
    from moe_models.routers.hash import HashRouter
    from moe_models.routers.topk import TopKRouter

    model = build("gpt", n_layers=3, layer_routers={0: {"name": "hash", "k": 2}})
    routers = [m.router for m in model.modules() if isinstance(m, MoEFeedForward)]
    assert [type(r) for r in routers] == [HashRouter, TopKRouter, TopKRouter]
    assert routers[0].options.k == 2 and [r.ctx.layer_index for r in routers] == [0, 1, 2]
    ids = torch.randint(V, (2, 8))
    out = model.eval()(ids, ids)
    assert out.moe[0].decision.expert_ids_TK.shape == (16, 2)


def test_a_router_for_a_dense_block_or_an_unknown_router_is_refused():
    fam = MODELS.get("gpt")
    with pytest.raises(ValidationError, match=r"layer_routers: block 0 is not an MoE block of this model \(blocks \[1, 2\] are\)"):
        fam.Options(**SMALL, n_layers=3, first_k_dense=1, layer_routers={0: {"name": "hash"}})
    with pytest.raises(ValidationError, match="layer_routers\\[1\\].name: 'hsh' is not a router"):
        fam.Options(**SMALL, n_layers=3, layer_routers={1: {"name": "hsh"}})
    with pytest.raises(ValidationError, match="k"):
        fam.Options(**SMALL, n_layers=3, layer_routers={1: {"name": "hash", "k": 0}})
