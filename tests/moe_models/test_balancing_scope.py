"""Balancing scope across real processes: two gloo ranks, each with its own micro-batch."""
import socket

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from moe_models.moe_ffn import MoEFeedForward, moe_forward
from moe_models.optimizer_hooks import after_optimizer_step
from tests.tiny_layers import tiny_moe

D, F, E, T = 8, 16, 4, 32


def layer(scope: str) -> MoEFeedForward:
    # seed 0: an identical router on both ranks, as data parallelism keeps it
    moe = tiny_moe("topk", {"k": 1}, d_model=D, expert_hidden=F, num_experts=E, vocab_size=10,
                   balancing={"switch_lbl": 1.0}, scope=scope)
    with torch.no_grad():  # feature 0 decides between experts 0 and 3: each rank's data leans to one side
        moe.router.proj.weight[:, 0] = torch.tensor([1.0, 0.3, -0.3, -1.0])
    return moe


def rank_batch(rank: int) -> torch.Tensor:
    x = torch.randn(1, T, D, generator=torch.Generator().manual_seed(100 + rank))
    x[..., 0] += 3.0 * (1 - 2 * rank)  # the ranks see different data, so their loads differ
    return x


def lbl(routes_E: torch.Tensor, probs_TE: torch.Tensor) -> float:
    return float(E * (routes_E / routes_E.sum() * probs_TE.mean(0)).sum())


def worker(rank: int, port: int, results) -> None:
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=2)
    ids = torch.zeros(1, T, dtype=torch.long)
    glob, local = layer("global_batch").train(), layer("micro_batch").train()
    x = rank_batch(rank)
    _, aux_global = moe_forward(glob, x, ids)
    _, aux_local = moe_forward(local, x, ids)
    window_after_one = glob.window_routes_E.clone()
    moe_forward(glob, x, ids)  # a second micro-batch of the same optimizer step adds to the window ...
    window_after_two = glob.window_routes_E.clone()
    after_optimizer_step(glob)  # ... and the optimizer step closes it
    results[rank] = (aux_global.unscaled["switch_lbl"].item(), aux_local.unscaled["switch_lbl"].item(),
                     window_after_one.tolist(), window_after_two.tolist(), glob.window_routes_E.sum().item())
    dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_global_batch_lbl_equals_the_lbl_of_the_concatenated_batch():
    results = mp.Manager().dict()
    mp.spawn(worker, args=(free_port(), results), nprocs=2, join=True)
    # Reference: both micro-batches concatenated in one process.
    ref = layer("micro_batch")
    x = torch.cat([rank_batch(0), rank_batch(1)], dim=1)
    decision = ref.router(x.reshape(-1, D), torch.zeros(2 * T, dtype=torch.long))
    concatenated = lbl(decision.routes_per_expert_E(), decision.probs_TE)
    global_mean = (results[0][0] + results[1][0]) / 2  # DP averages the ranks' gradients, hence their losses
    local_mean = (results[0][1] + results[1][1]) / 2
    assert global_mean == pytest.approx(concatenated, rel=1e-5)
    assert abs(local_mean - concatenated) > 0.05  # per-rank balancing is a different objective
    window_one, window_two = torch.tensor(results[0][2]), torch.tensor(results[0][3])
    assert window_one.sum() == 2 * T and results[1][2] == results[0][2]  # all-reduced: same counts on both ranks
    assert torch.equal(window_two, 2 * window_one) and results[0][4] == 0
