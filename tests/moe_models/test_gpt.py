"""The decoder LM: causality, MoE placement, the dense baseline's size."""
import torch

from moe_models.experts import ExpertFFN
from moe_models.models import MODELS
from moe_models.moe_ffn import MoEFeedForward
from moe_models.routers import ROUTERS
from moe_models.spec import RoutingSpec

V, S = 64, 12
gpt = MODELS.get("gpt")


def model(routing: RoutingSpec, **opts):
    torch.manual_seed(0)
    options = gpt.Options(**{"d_model": 32, "n_layers": 4, "n_heads": 4, "num_experts": 4, "expert_hidden": 48, **opts})
    return gpt.build(options, routing, V, S, 0).eval()


TOPK2 = RoutingSpec("topk", ROUTERS.get("topk").Options(k=2), {"switch_lbl": 0.01})


def test_moe_every_places_moe_blocks():
    m = model(TOPK2, moe_every=2)
    kinds = [type(b.ffn) for b in m.blocks]
    assert kinds == [ExpertFFN, MoEFeedForward, ExpertFFN, MoEFeedForward]


def test_dense_baseline_has_no_moe_and_scaled_hidden():
    m = model(RoutingSpec("dense", dense_active_experts=2))
    assert all(isinstance(b.ffn, ExpertFFN) and b.ffn.up.out_features == 96 for b in m.blocks)
    out = m(torch.randint(V, (2, S)), torch.randint(V, (2, S)))
    assert out.moe == {} and out.aux_loss.item() == 0.0


def test_moe_model_is_causal():
    """Changing a future token must not change the loss contribution of earlier positions (token routing is
    per token, so top-k and hash routing keep the decoder causal)."""
    for routing in (TOPK2, RoutingSpec("hash")):
        m = model(routing)
        ids = torch.randint(V, (1, S))
        changed = ids.clone()
        changed[0, -1] = (ids[0, -1] + 1) % V
        h = lambda x: m.ln_f(_hidden(m, x))  # noqa: E731
        torch.testing.assert_close(h(ids)[:, :-1], h(changed)[:, :-1])


def _hidden(m, ids):
    x = m.tok_emb(ids) + m.pos_emb(torch.arange(ids.shape[1]))
    m.moe_recorder.begin(ids)
    for block in m.blocks:
        x = block(x)
    return x


def test_initial_loss_is_near_uniform():
    m = model(TOPK2)
    out = m(torch.randint(V, (4, S)), torch.randint(V, (4, S)))
    assert abs(out.lm_loss.item() - torch.log(torch.tensor(float(V))).item()) < 0.3
    assert set(out.moe) == {0, 1, 2, 3}


def test_study_file_can_choose_the_grouped_backend_and_it_trains():
    m = model(TOPK2, dispatch="grouped").train()
    assert all(type(b.ffn.dispatch).__name__ == "GroupedDispatch" for b in m.blocks)
    ids = torch.randint(V, (4, S))
    optimizer = torch.optim.AdamW(m.parameters(), lr=3e-3)
    losses = []
    for _ in range(15):  # one fixed batch: the loss must fall
        out = m(ids[:, :-1], ids[:, 1:])
        optimizer.zero_grad()
        out.loss.backward()
        optimizer.step()
        losses.append(out.lm_loss.item())
    assert losses[-1] < losses[0] - 0.5
