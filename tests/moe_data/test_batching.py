"""`training.batching: by_domain`: every micro-batch from one domain, domains drawn in proportion to their windows
(so the data seen overall matches random windows), exact single-domain windows, and cell ids that stay what they
were for the default order."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from scipy import stats

from moe_data.prepare import PreparedData, single_domain_pools
from moe_data.shards import ShardIndex, SplitWriter
from workflows.study.cells import expand
from workflows.study.loading import load_study, parse_study
from tests.processes import REPO


def labelled(domain_N: torch.Tensor, num_domains: int, folder: Path, shard_tokens: int = 1 << 20) -> PreparedData:
    """A train split of tokens 0..96 repeating, with the given per-token domains, written as shards."""
    writer = SplitWriter(folder, "train", 97, shard_tokens=shard_tokens)
    for d, n in zip(*torch.unique_consecutive(domain_N, return_counts=True)):
        writer.append(np.arange(writer.written, writer.written + int(n)) % 97, int(d))
    writer.close()
    ShardIndex(97, [f"d{i}" for i in range(num_domains)], "fp", "tok", "test", 0, "uint16", "int8",
               {"train": writer.shard_sizes}).write(folder)
    return PreparedData(folder)


def starts_of(pools, d: int) -> list[tuple[int, int]]:
    runs, _ = pools[d]
    return [(int(s), int(a) + k) for s, a, n in runs.tolist() for k in range(n)]


@pytest.mark.parametrize("shard_tokens", [1 << 20, 97])  # one shard, and many (windows never cross one's end)
def test_single_domain_windows_match_a_brute_force_scan(tmp_path, shard_tokens):
    gen = torch.Generator().manual_seed(0)
    runs = torch.randint(1, 12, (60,), generator=gen)
    labels = torch.randint(-1, 3, (60,), generator=gen)  # -1: unlabelled stretches
    domain_N = torch.repeat_interleave(labels, runs)
    seq_len = 5
    data = labelled(domain_N, 3, tmp_path, shard_tokens)
    pools = single_domain_pools(data.split("train"), seq_len, 3)
    for d in range(3):
        expected = []
        for shard, n in enumerate(data.split("train").sizes):
            dom = domain_N[shard * shard_tokens:shard * shard_tokens + n]
            expected += [(shard, p) for p in range(n - seq_len - 1) if bool((dom[p:p + seq_len + 1] == d).all())]
        assert starts_of(pools, d) == expected


def test_domain_runs_are_found_across_chunk_boundaries(tmp_path):
    domain_N = torch.repeat_interleave(torch.tensor([0, 1, 0, 2, -1, 2]), torch.tensor([5, 7, 3, 9, 4, 6]))
    data = labelled(domain_N, 3, tmp_path)
    expected = [(0, 0, 5, 0), (0, 5, 7, 1), (0, 12, 3, 0), (0, 15, 9, 2), (0, 24, 4, -1), (0, 28, 6, 2)]
    assert data.split("train").domain_runs(chunk=4) == expected == data.split("train").domain_runs()


def test_by_domain_micro_batches_hold_one_domain_drawn_in_proportion_to_its_windows(tmp_path):
    domain_N = torch.cat([torch.full((n,), d) for d, n in ((0, 3000), (1, 1000), (2, 6000), (0, 2000))])
    data = labelled(domain_N, 3, tmp_path)
    seq_len, draws = 16, 3000
    seen = torch.zeros(3)
    for i in range(draws):
        batch = data.sample("train", 4, torch.Generator().manual_seed(i), seq_len, batching="by_domain")
        x, y, dom = batch.inputs
        assert dom.unique().numel() == 1  # one domain per micro-batch
        assert torch.equal(y[:, :-1], x[:, 1:])  # still next-token windows
        seen[int(dom[0, 0])] += 1
    pools = single_domain_pools(data.split("train"), seq_len, 3)
    windows = torch.tensor([len(starts_of(pools, d)) for d in range(3)], dtype=torch.float)
    expected = windows / windows.sum() * draws
    assert stats.chisquare(seen.numpy(), expected.numpy()).pvalue > 1e-3
    mixed = data.sample("train", 64, torch.Generator().manual_seed(0), seq_len).inputs[2]
    assert mixed[:, 0].unique().numel() > 1  # random windows mix domains


def test_by_domain_needs_labels(tmp_path):
    data = labelled(torch.full((500,), -1), 0, tmp_path)
    with pytest.raises(ValueError, match="by_domain needs domain labels"):
        data.sample("train", 2, torch.Generator(), 8, batching="by_domain")


def test_the_default_order_keeps_every_existing_cell_id_and_by_domain_is_part_of_it():
    study = load_study(REPO / "studies" / "quickstart.yaml")
    # The quickstart's ids before the option existed (bench/results/orchestration_cpu2_baseline.json).
    assert {"7c14164707aa", "f02f85fe319e", "589624b3442b", "3156216b28bb"} <= {c.id for c in expand(study)}
    raw = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    raw["training"]["batching"] = "by_domain"
    by_domain = {c.id for c in expand(parse_study(raw))}
    assert by_domain.isdisjoint({c.id for c in expand(study)})
