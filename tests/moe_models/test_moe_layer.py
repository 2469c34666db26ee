"""The MoE FFN on the DeepSpeed dispatch backend against a plain reference computation, and the grouped backend
against the DeepSpeed backend; for GELU experts (with biases) and SwiGLU experts (without) alike."""
import copy
import functools

import pytest
import torch

from moe_models.dispatch import DISPATCH_BACKENDS, DispatchSpec
from moe_models.experts import ACTIVATIONS, ExpertFFN
from moe_models.moe_ffn import MoEFeedForward, moe_forward
from moe_models.routers import ROUTERS, RouterContext
from tests.moe_models.test_modern_routing import MODERN
from tests.tiny_layers import tiny_moe

D, F, E, V = 16, 32, 4, 40


DOMAINS = 2


def build(router="topk", capacity_factor=None, balancing=None, num_experts=E, activation="gelu", **options):
    return tiny_moe(router, options, d_model=D, expert_hidden=F, num_experts=num_experts, vocab_size=V,
                    activation=activation, capacity_factor=capacity_factor, balancing=balancing, num_domains=DOMAINS,
                    token_counts_V=torch.arange(V).float())


def experts_of(layer):
    return list(layer.dispatch.moe.deepspeed_moe.experts.deepspeed_experts)


def decide(layer, x_TD, ids_T, dom_T):
    return layer.router(x_TD, ids_T, dom_T) if layer.router.needs_domains else layer.router(x_TD, ids_T)


def reference(layer, x_TD, ids_T, dom_T):
    """sum_k w_tk * expert_{e_tk}(x_t), one token at a time: what any dispatch must compute without drops."""
    decision = decide(layer, x_TD, ids_T, dom_T)
    experts = experts_of(layer)
    out = torch.zeros_like(x_TD)
    for t in range(x_TD.shape[0]):
        for k in range(decision.expert_ids_TK.shape[1]):
            if decision.active_TK[t, k]:
                out[t] += decision.weights_TK[t, k] * experts[decision.expert_ids_TK[t, k]](x_TD[t])
    return out


ROUTER_CASES = [("topk", {"k": 1}), ("topk", {"k": 2}), ("topk", {"k": 3}), ("topk", {"k": 2, "assignment": "sinkhorn"}),
                ("topk", {"assignment": "base"}), ("hash", {}), ("hash", {"k": 2, "table": "balanced"}),
                ("expert_choice", {"capacity": 1.5}), ("top_p", {"p": 0.6}),
                ("entropy_adaptive", {"max_k": 3}), ("top_any", {"init_threshold": -0.05}), ("mlp", {"k": 2}),
                ("attention", {"k": 2}), ("hybrid", {"k": 2}), ("mlp_hadamard", {"k": 2}), ("reference", {}),
                ("self_supervised", {"k": 2}),
                # forced uniform routing draws anew on every call, so a second forward is no reference for the first
                *(("topk", options) for case, options in MODERN.items() if case != "uniform")]


def test_every_registered_router_is_covered():
    assert {name for name, _ in ROUTER_CASES} == set(ROUTERS.names())


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("router,options", ROUTER_CASES, ids=[f"{n}{o}" for n, o in ROUTER_CASES])
def test_dropless_dispatch_conserves_every_token(router, options, activation):
    layer = build(router, activation=activation, **options).eval()  # eval: no jitter, so the reference sees the same decision
    x, ids, dom = torch.randn(2, 24, D), torch.randint(V, (2, 24)), torch.randint(DOMAINS, (2, 24))
    y, aux = moe_forward(layer, x, ids, dom)
    flat = (x.reshape(-1, D), ids.reshape(-1), dom.reshape(-1))
    torch.testing.assert_close(y.reshape(-1, D), reference(layer, *flat), rtol=1e-5, atol=1e-6)
    routes = decide(layer, *flat).active_TK.sum().item()
    assert aux.sums["kept_routes"].item() == routes  # every route served, variable experts per token included


def test_single_expert_with_weight_one_is_the_dense_ffn():
    layer = build("topk", num_experts=1, k=1)
    x, ids = torch.randn(1, 10, D), torch.randint(V, (1, 10))
    y, _ = moe_forward(layer, x, ids)
    torch.testing.assert_close(y, experts_of(layer)[0](x))  # softmax over one expert = weight 1


def test_capacity_drops_routes_and_dropped_tokens_get_zero_output():
    layer = build("hash", capacity_factor=0.25).eval()
    x, ids = torch.randn(1, 32, D), torch.randint(V, (1, 32))
    y, aux = moe_forward(layer, x, ids)
    kept = layer.dispatch.gate.kept_TK[:, 0]
    assert aux.sums["kept_routes"].item() == kept.sum().item() <= E * 2  # capacity = ceil(0.25*32/4) = 2
    assert (y[0, ~kept] == 0).all() and (y[0, kept].abs().sum(-1) > 0).all()


def test_scaled_lbl_equals_alpha_under_balanced_routing():
    alpha = 0.037
    layer = build("hash", balancing={"switch_lbl": alpha})
    table = layer.router.table_VK[:, 0]
    ids = torch.cat([torch.nonzero(table == e)[:1, 0] for e in range(E)]).repeat(5).view(1, -1)
    _, aux = moe_forward(layer, torch.randn(1, ids.shape[1], D), ids)
    assert aux.unscaled["switch_lbl"].item() == pytest.approx(1.0)
    assert aux.loss.item() == pytest.approx(alpha)


def test_gradients_reach_router_and_the_experts_that_received_tokens():
    layer = build("topk", k=2, balancing={"switch_lbl": 0.01, "z_loss": 0.001})
    x, ids = torch.randn(2, 8, D), torch.randint(V, (2, 8))
    y, aux = moe_forward(layer, x, ids)
    (y.square().mean() + aux.loss).backward()
    assert layer.router.proj.weight.grad.abs().sum() > 0
    used = set(layer.router(x.reshape(-1, D), ids.reshape(-1)).expert_ids_TK.flatten().tolist())
    for e, expert in enumerate(experts_of(layer)):
        grad = expert.up.weight.grad
        assert (grad is not None and grad.abs().sum() > 0) == (e in used)


def test_expert_parameters_are_marked_for_deepspeed():
    from deepspeed.moe.utils import is_moe_param

    layer = build("topk", k=1)
    expert_params = [p for e in experts_of(layer) for p in e.parameters()]
    assert expert_params and all(is_moe_param(p) for p in expert_params)
    assert not any(is_moe_param(p) for p in layer.router.parameters())
    assert isinstance(experts_of(layer)[0], ExpertFFN)


def test_routing_analytics_are_computed_in_evaluation_only():
    layer = build("topk", k=2)
    x, ids = torch.randn(1, 8, D), torch.randint(V, (1, 8))
    _, train_aux = moe_forward(layer.train(), x, ids)
    _, eval_aux = moe_forward(layer.eval(), x, ids)
    assert train_aux.sums == {} and train_aux.expert_mask_TE is None
    assert eval_aux.sums["kept_routes"].item() == 16 and eval_aux.expert_mask_TE.sum().item() == 16


# --- the grouped backend against the DeepSpeed backend ---------------------------------------------------------------
def grouped_twin(layer: MoEFeedForward) -> MoEFeedForward:
    """The same router (a copy) and the same expert weights, on the grouped dispatch backend."""
    twin = MoEFeedForward(copy.deepcopy(layer.router), DISPATCH_BACKENDS.get("grouped")(layer.dispatch.spec),
                          {name: coef for name, (_, coef) in layer.balancing.items()}, layer.balancing_scope)
    stacked = twin.dispatch.experts
    with torch.no_grad():
        for e, expert in enumerate(experts_of(layer)):
            stacked.up_weight_EFD[e].copy_(expert.up.weight)
            stacked.down_weight_EDF[e].copy_(expert.down.weight)
            if expert.up.bias is not None:  # GELU experts; SwiGLU ones have no biases
                stacked.up_bias_EF[e].copy_(expert.up.bias)
                stacked.down_bias_ED[e].copy_(expert.down.bias)
    return twin.train(layer.training)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("router,options", ROUTER_CASES, ids=[f"{n}{o}" for n, o in ROUTER_CASES])
def test_grouped_backend_matches_deepspeed_outputs_and_gradients(router, options, activation):
    layer = build(router, activation=activation, **options).eval()
    twin = grouped_twin(layer)
    x, ids, dom = torch.randn(2, 24, D), torch.randint(V, (2, 24)), torch.randint(DOMAINS, (2, 24))
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, aux_a = moe_forward(layer, xa, ids, dom)
    yb, aux_b = moe_forward(twin, xb, ids, dom)
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)
    (ya.square().sum() + aux_a.loss).backward()
    (yb.square().sum() + aux_b.loss).backward()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    for (name, pa), pb in zip(layer.router.named_parameters(), twin.router.parameters()):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-5, atol=1e-6, msg=f"router grad {name}")
    up_grads = torch.stack([e.up.weight.grad if e.up.weight.grad is not None else torch.zeros_like(e.up.weight)
                            for e in experts_of(layer)])
    torch.testing.assert_close(twin.dispatch.experts.up_weight_EFD.grad, up_grads, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("policy", ["position", "probs"])
def test_grouped_backend_drops_the_same_routes_under_a_capacity_factor(policy, activation):
    torch.manual_seed(0)
    cls = ROUTERS.get("topk")
    router = cls(RouterContext(D, E, V, 0, 0), cls.Options(k=2))
    spec = DispatchSpec(D, F, E, 1, 0.5, policy, activation)
    layer = MoEFeedForward(router, DISPATCH_BACKENDS.get("deepspeed")(spec), {}).eval()
    twin = grouped_twin(layer)
    x, ids = torch.randn(1, 40, D), torch.randint(V, (1, 40))
    ya, aux_a = moe_forward(layer, x, ids)
    yb, aux_b = moe_forward(twin, x, ids)
    assert aux_a.sums["kept_routes"].item() < 80  # some routes were dropped ...
    assert torch.equal(layer.dispatch.gate.kept_TK, twin.dispatch(x[0], twin.router(x[0], ids[0])).kept_TK)  # ... the same ones
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-6)


MODEL_CASES = {"gpt-gelu": ("gpt", {}), "gpt-swiglu-shared": ("gpt", {"expert_activation": "swiglu",
                                                                       "num_shared_experts": 1,
                                                                       "shared_expert_gate": True}),
               "llama": ("llama", {})}


def model_on(dispatch: str, case: str = "gpt-gelu", seed: int = 3):
    from moe_models.models import MODELS
    from moe_models.spec import RoutingSpec

    name, extra = MODEL_CASES[case]
    family = MODELS.get(name)
    opts = family.Options(d_model=D, n_heads=2, num_experts=E, expert_hidden=F, n_layers=2, dispatch=dispatch, **extra)
    return family.build(opts, RoutingSpec("topk", ROUTERS.get("topk").Options(k=2)), V, 16, seed)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_both_backends_build_the_same_model_with_the_same_state_dict(case):
    """Checkpoint interchange: the grouped backend's state dict speaks DeepSpeed's per-expert layout, and both
    backends initialize experts from the same (seed, name, global expert id) generators."""
    ds, grouped = model_on("deepspeed", case), model_on("grouped", case)
    ds_state, grouped_state = ds.state_dict(), grouped.state_dict()
    assert ds_state.keys() == grouped_state.keys()
    biased = ds.opts.expert_activation == "gelu"  # SwiGLU experts have no biases
    assert any(".deepspeed_moe.experts.deepspeed_experts.3.down.bias" in k for k in grouped_state) == biased
    for key in ds_state:
        torch.testing.assert_close(grouped_state[key], ds_state[key], rtol=0, atol=0, msg=key)
    ids = torch.randint(V, (2, 16))
    torch.testing.assert_close(grouped(ids, ids).loss, ds(ids, ids).loss, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("case", MODEL_CASES)
def test_a_checkpoint_of_either_backend_loads_into_the_other(case):
    ds, grouped = model_on("deepspeed", case, seed=1), model_on("grouped", case, seed=2)
    with torch.no_grad():
        for p in ds.parameters():
            p.add_(torch.randn_like(p) * 0.1)  # weights no init would produce
    ids = torch.randint(V, (2, 16))
    grouped.load_state_dict(ds.state_dict())
    torch.testing.assert_close(grouped(ids, ids).loss, ds(ids, ids).loss, rtol=1e-5, atol=1e-6)
    back = model_on("deepspeed", case, seed=5)
    back.load_state_dict(grouped.state_dict())
    torch.testing.assert_close(back(ids, ids).loss, ds(ids, ids).loss, rtol=1e-5, atol=1e-6)


def test_grouped_expert_parameters_are_marked_for_deepspeed():
    from deepspeed.moe.layer import MoE
    from deepspeed.moe.utils import is_moe_param

    layer = MoEFeedForward(build("topk", k=1).router, DISPATCH_BACKENDS.get("grouped")(DispatchSpec(D, F, E, 2, None,
                                                                                                    "position")), {})
    assert isinstance(layer.dispatch.moe, MoE) and layer.dispatch.moe.num_local_experts == E // 2
    assert layer.dispatch.experts.up_weight_EFD.shape[0] == E // 2
    assert all(is_moe_param(p) and p.group_name == "ep_size_2" for p in layer.dispatch.experts.parameters())
    assert not any(is_moe_param(p) for p in layer.router.parameters())


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_grouped_backend_expert_paths_agree(activation):
    """The CPU path (per-expert slices), the padded batched path (CUDA, non-bf16) and torch's grouped GEMM (CUDA bf16;
    forward-only on CPU) compute the same expert outputs, an expert with no routes included; sliced and padded also
    give the same weight gradients."""
    from moe_models.dispatch.stacked_experts import StackedExperts

    torch.manual_seed(0)
    experts = StackedExperts(4, 16, 32, activation)
    counts = torch.tensor([3, 0, 5, 2])
    expert_R = torch.repeat_interleave(torch.arange(4), counts)
    x = torch.randn(len(expert_R), 16)
    outputs, grads = {}, {}
    for path in ("sliced", "padded"):
        experts.zero_grad()
        outputs[path] = getattr(experts, path)(x, expert_R, counts)
        outputs[path].square().sum().backward()
        grads[path] = [p.grad.clone() for p in experts.parameters()]
    torch.testing.assert_close(outputs["padded"], outputs["sliced"], rtol=1e-5, atol=1e-6)
    for a, b in zip(grads["padded"], grads["sliced"]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        torch.testing.assert_close(experts.grouped(x, expert_R, counts), outputs["sliced"], rtol=1e-5, atol=1e-6)
        # groups padded to 8-row boundaries (what compiled graphs run) give the same rows back
        torch.testing.assert_close(experts.grouped(x, expert_R, counts, align=8), outputs["sliced"], rtol=1e-5,
                                   atol=1e-6)


def test_fused_bias_functions_match_autograd_of_the_plain_expressions():
    """The grouped backend's bias(+GELU) ops (eager on CPU; the same functions compiled on CUDA) against autograd of
    gelu(h + b[e]) and y + b[e]: outputs, input gradients and per-expert bias gradients (sums over each group)."""
    from moe_models.dispatch.fused import AddBias, BiasGelu

    torch.manual_seed(0)
    expert_R = torch.tensor([0, 0, 2, 2, 2])  # expert 1 has no rows
    offsets = torch.tensor([2, 2, 5])
    for op, plain in ((BiasGelu, lambda h, b: torch.nn.functional.gelu(h + b[expert_R])),
                      (AddBias, lambda h, b: h + b[expert_R])):
        h, b = torch.randn(5, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
        ha, ba, hb, bb = (t.clone().requires_grad_() for t in (h, b, h, b))
        grad = torch.randn(5, 4, dtype=torch.float64)
        ya, yb = op.apply(ha, ba, expert_R, offsets), plain(hb, bb)
        torch.testing.assert_close(ya, yb)
        ya.backward(grad)
        yb.backward(grad)
        torch.testing.assert_close(ha.grad, hb.grad)
        torch.testing.assert_close(ba.grad, bb.grad)
        assert (ba.grad[1] == 0).all()


NO_HOST_READ_CASES = [("topk", {"k": 2}, None), ("hash", {"k": 2}, None), ("mlp", {"k": 2}, None),
                      ("top_p", {"p": 0.5}, None), ("entropy_adaptive", {"max_k": 3}, None),
                      ("top_any", {"init_threshold": -0.05}, None), ("expert_choice", {"capacity": 1.5}, None),
                      ("topk", {"k": 2}, 1.0)]


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("align", [1, 8], ids=["eager-layout", "compiled-layout"])
@pytest.mark.parametrize("router,options,capacity_factor", NO_HOST_READ_CASES,
                         ids=[f"{r}{o}-cf{c}" for r, o, c in NO_HOST_READ_CASES])
def test_grouped_gemm_path_never_reads_a_tensor_on_the_host(router, options, capacity_factor, align, activation,
                                                           monkeypatch):
    """The CUDA bf16 path (torch's grouped GEMM, fused bias ops), a training forward and backward with balancing
    losses, on meta tensors: they have shapes but no values, so any host read (.item(), .tolist(), a shape that
    depends on data) raises. Fixed-k routing sizes its plan exactly; variable-k and capacity-limited routing (K <= 4
    slots here) with filler rows. The CPU-checkable half of the GPU test that runs under
    torch.cuda.set_sync_debug_mode("error")."""
    layer = grouped_twin(build(router, capacity_factor, balancing={"switch_lbl": 0.01, "z_loss": 0.001},
                               activation=activation, **options))
    layer = layer.train().to("meta", torch.bfloat16)
    monkeypatch.setattr(layer.dispatch, "grouped_gemm_applies", lambda x: True)  # meta tensors are not CUDA ones
    experts = layer.dispatch.experts
    monkeypatch.setattr(experts, "grouped", functools.partial(type(experts).grouped, experts, align=align))
    x = torch.randn(2, 64, D, device="meta", dtype=torch.bfloat16, requires_grad=True)
    y, aux = moe_forward(layer, x, torch.randint(V, (2, 64), device="meta"))
    (y.float().square().sum() + aux.loss).backward()
    assert x.grad.shape == x.shape and experts.up_weight_EFD.grad.shape == experts.up_weight_EFD.shape
    if activation == "gelu":
        assert experts.up_bias_EF.grad.shape == experts.up_bias_EF.shape


FILLER_CASES = [("top_p", {"p": 0.5}, None), ("top_any", {"init_threshold": -0.05}, None), ("topk", {"k": 2}, 0.75)]


@pytest.mark.parametrize("router,options,capacity_factor", FILLER_CASES,
                         ids=[f"{r}{o}-cf{c}" for r, o, c in FILLER_CASES])
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("align", [1, 8], ids=["eager-layout", "compiled-layout"])
def test_filler_rows_through_torchs_grouped_gemm_give_the_read_plan_outputs(router, options, capacity_factor, align,
                                                                           activation, monkeypatch):
    """Variable-k or capacity-limited routing on the grouped-GEMM path (forward: torch's CPU grouped GEMM) plans
    filler rows instead of reading the route count; its outputs equal the default CPU path's (exact rows,
    per-expert slices)."""
    layer = grouped_twin(build(router, capacity_factor, activation=activation, **options)).eval()
    x, ids = torch.randn(2, 24, D), torch.randint(V, (2, 24))
    with torch.no_grad():
        expected, aux = moe_forward(layer, x, ids)
        monkeypatch.setattr(layer.dispatch, "grouped_gemm_applies", lambda x: True)
        experts = layer.dispatch.experts
        monkeypatch.setattr(experts, "grouped", functools.partial(type(experts).grouped, experts, align=align))
        decision = layer.router(x.reshape(-1, D), ids.reshape(-1))
        assert layer.dispatch.sizing(x, decision, capacity_factor is None) == "filler"
        got, aux_filler = moe_forward(layer, x, ids)
    assert aux.sums["kept_routes"] < 2 * 24 * decision.expert_ids_TK.shape[1]  # some slots are filler
    assert aux_filler.sums["kept_routes"] == aux.sums["kept_routes"]
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)
