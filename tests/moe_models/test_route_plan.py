"""Route plans: sorted by expert, every served slot exactly once, and gather-based backwards equal to autograd's —
for every sizing, filler rows holding NaN included (they carry undefined values by contract)."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_models.dispatch.route_plan import combine_rows, dispatch_rows, plan_routes


ROUTINGS = dict(T=st.integers(1, 12), K=st.integers(1, 4), E=st.integers(1, 5), seed=st.integers(0, 10_000),
                sizing=st.sampled_from(["exact", "filler", "read"]))


def random_routing(T, K, E, seed, sizing):
    """Expert ids per slot, which slots are served (all for "exact", else ~60%), the plan, and the generator."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(E, (T, K), generator=gen)
    kept = torch.ones(T, K, dtype=torch.bool) if sizing == "exact" else torch.rand(T, K, generator=gen) < 0.6
    return ids, kept, plan_routes(ids, kept, E, sizing), gen


@settings(max_examples=40, deadline=None)
@given(**ROUTINGS)
def test_plan_covers_each_served_slot_once_sorted_by_expert(T, K, E, seed, sizing):
    ids, kept, plan, _ = random_routing(T, K, E, seed, sizing)
    served = int(kept.sum())
    assert plan.num_rows == (served if sizing == "read" else T * K)
    # conservation: the first `served` rows are the served slots, each once; then filler rows, the unserved slots
    assert sorted(plan.order_R[:served].tolist()) == kept.reshape(-1).nonzero().squeeze(-1).tolist()
    filler = [] if sizing == "read" else (~kept).reshape(-1).nonzero().squeeze(-1).tolist()
    assert sorted(plan.order_R[served:].tolist()) == filler
    assert (plan.expert_R[1:] >= plan.expert_R[:-1]).all()
    assert torch.equal(plan.expert_R[:served], ids.reshape(-1)[plan.order_R[:served]])
    assert torch.equal(plan.counts_E, torch.bincount(ids[kept], minlength=E))
    assert torch.equal(plan.order_R[plan.slot_row_S[kept.reshape(-1)]], kept.reshape(-1).nonzero().squeeze(-1))
    if sizing == "read":
        assert (plan.slot_row_S[~kept.reshape(-1)] == plan.num_rows).all()
    else:  # every slot has its own row
        assert sorted(plan.slot_row_S.tolist()) == list(range(T * K))


@settings(max_examples=25, deadline=None)
@given(**ROUTINGS)
def test_dispatch_and_combine_match_plain_indexing_and_its_gradients(T, K, E, seed, sizing):
    ids, kept, plan, gen = random_routing(T, K, E, seed, sizing)
    x = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(T, K, 1, generator=gen, dtype=torch.float64)
    filler_R = torch.arange(plan.num_rows) >= int(kept.sum())

    def experts(rows):  # f_e(x) = (1 + e) sin(x); filler rows come out NaN, as undefined memory may
        return torch.where(filler_R.unsqueeze(-1), float("nan"), rows.sin() * (1 + plan.expert_R.unsqueeze(-1)))

    def ours(x):
        return combine_rows(experts(dispatch_rows(x, plan)), w.squeeze(-1) * kept, plan)

    def reference(x):  # token by token: sum over served slots of w * f_e(x_t)
        return torch.stack([sum((w[t, k] * x[t].sin() * (1 + ids[t, k]) for k in range(K) if kept[t, k]),
                                0 * x[t]) for t in range(T)])

    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), reference(xb)
    torch.testing.assert_close(ya, yb)
    g = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    ya.backward(g)
    yb.backward(g)
    torch.testing.assert_close(xa.grad, xb.grad)


@settings(max_examples=25, deadline=None)
@given(**ROUTINGS)
def test_filler_gradients_that_come_back_undefined_are_masked(T, K, E, seed, sizing):
    """The experts' backward leaves filler rows' input gradients undefined (the grouped GEMM skips them): NaN there
    must not reach any token's gradient."""
    ids, kept, plan, gen = random_routing(T, K, E, seed, sizing)
    filler_R = (torch.arange(plan.num_rows) >= int(kept.sum())).unsqueeze(-1)

    class PoisonFillerGrad(torch.autograd.Function):
        @staticmethod
        def forward(ctx, rows):
            return rows.clone()

        @staticmethod
        def backward(ctx, grad):
            return torch.where(filler_R, float("nan"), grad)

    x = torch.randn(T, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    y = combine_rows(PoisonFillerGrad.apply(dispatch_rows(x, plan)) * 2, kept.double(), plan)
    y.sum().backward()
    torch.testing.assert_close(x.grad, 2 * kept.sum(1, keepdim=True).double().expand(T, 3))
