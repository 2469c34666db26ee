"""Route plans: sorted by expert, every served slot exactly once, and gather-based backwards equal to autograd's."""
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_models.dispatch.route_plan import combine_rows, dispatch_rows, plan_routes


ROUTINGS = dict(T=st.integers(1, 12), K=st.integers(1, 4), E=st.integers(1, 5), seed=st.integers(0, 10_000),
                all_served=st.booleans())


def random_routing(T, K, E, seed, all_served):
    """Expert ids per slot, which slots are served (all, or ~60%), the plan, and the generator for more draws."""
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(E, (T, K), generator=gen)
    kept = torch.ones(T, K, dtype=torch.bool) if all_served else torch.rand(T, K, generator=gen) < 0.6
    return ids, kept, plan_routes(ids, kept, E, all_served), gen


@settings(max_examples=40, deadline=None)
@given(**ROUTINGS)
def test_plan_covers_each_served_slot_once_sorted_by_expert(T, K, E, seed, all_served):
    ids, kept, plan, _ = random_routing(T, K, E, seed, all_served)
    assert sorted(plan.order_R.tolist()) == kept.reshape(-1).nonzero().squeeze(-1).tolist()  # conservation
    assert (plan.expert_R[1:] >= plan.expert_R[:-1]).all()
    assert torch.equal(plan.expert_R, ids.reshape(-1)[plan.order_R])
    assert torch.equal(plan.counts_E, torch.bincount(ids[kept], minlength=E))
    served_rows = plan.slot_row_S[kept.reshape(-1)]
    assert sorted(served_rows.tolist()) == list(range(plan.num_routes))
    assert (plan.slot_row_S[~kept.reshape(-1)] == plan.num_routes).all()


@settings(max_examples=25, deadline=None)
@given(**ROUTINGS)
def test_dispatch_and_combine_match_plain_indexing_and_its_gradients(T, K, E, seed, all_served):
    ids, kept, plan, gen = random_routing(T, K, E, seed, all_served)
    x = torch.randn(T, 3, generator=gen, dtype=torch.float64)
    w = torch.randn(T, K, 1, generator=gen, dtype=torch.float64)

    def ours(x):
        rows = dispatch_rows(x, plan)
        return combine_rows(rows.sin() * (1 + plan.expert_R.unsqueeze(-1)), w.squeeze(-1) * kept, plan)

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
