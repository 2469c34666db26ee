"""The Pareto front the study's plot draws: exactly the routers no other beats on both quality and cost."""
from __future__ import annotations

import itertools

from hypothesis import given
from hypothesis import strategies as st

from workflows.report.plots import pareto_front


def test_pareto_front_of_loss_against_flops_and_against_throughput():
    points = [(1.0, 4.0), (1.3, 3.9), (1.5, 3.9), (2.0, 3.95), (3.0, 3.8)]
    # lower FLOPs and lower loss are better: (1.5, 3.9) is tied on loss by a cheaper one, (2.0, 3.95) beaten
    assert pareto_front(points, x_higher=False, y_higher=False) == [0, 1, 4]
    # tokens/s: higher is better, so the fastest and the best-quality points are the front
    speed = [(20_000, 4.0), (15_000, 3.9), (18_000, 3.9), (5_000, 3.8)]
    assert pareto_front(speed, x_higher=True, y_higher=False) == [3, 2, 0]


@given(st.lists(st.tuples(st.integers(0, 9), st.integers(0, 9)), min_size=1, max_size=12))
def test_front_points_are_undominated_and_every_other_point_is_dominated(points):
    front = set(pareto_front(points, x_higher=False, y_higher=False))

    def dominates(a, b):
        return a[0] <= b[0] and a[1] <= b[1] and a != b

    for i, j in itertools.permutations(range(len(points)), 2):
        if i in front and j in front:
            assert not dominates(points[j], points[i])
    for i in set(range(len(points))) - front:
        assert any(dominates(points[j], points[i]) for j in range(len(points)))
    assert front


def test_the_plot_draws_quality_against_each_cost_it_has_inference_latency_included(tmp_path, monkeypatch):
    import matplotlib.figure

    from workflows.report.plots import pareto_plot
    from workflows.report.pooled import Estimate, PooledRow

    def row(router, loss, mflop, ms):
        return PooledRow(router, "gpt", "builtin:domains", [0, 1, 2],
                         {"eval loss": Estimate(loss, 0.01, 3), "train MFLOP/token": Estimate(mflop, 0.01, 3),
                          "ms/token": Estimate(ms, 0.1, 3)})

    panels = []
    real = matplotlib.figure.Figure.savefig
    monkeypatch.setattr(matplotlib.figure.Figure, "savefig",
                        lambda fig, *a, **k: panels.extend(ax.get_xlabel() for ax in fig.axes) or real(fig, *a, **k))
    path = pareto_plot([row("top1", 4.0, 1.0, 2.0), row("top2", 3.9, 1.5, 2.6)], tmp_path / "pareto.png")
    assert path.exists()
    assert panels == ["train MFLOP/token (lower is better)", "ms/token (lower is better)"]  # no tokens/s logged
