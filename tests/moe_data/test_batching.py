"""`training.batching: by_domain`: every micro-batch from one domain, domains drawn in proportion to their windows
(so the data seen overall matches random windows), exact single-domain windows, and cell ids that stay what they
were for the default order."""
from __future__ import annotations

import pytest
import torch
import yaml
from scipy import stats

from moe_data.prepare import PreparedData, single_domain_starts
from workflows.study.cells import expand
from workflows.study.loading import load_study, parse_study
from tests.processes import REPO


def labelled(domain_N: torch.Tensor, num_domains: int) -> PreparedData:
    tokens = torch.arange(domain_N.numel()) % 97
    return PreparedData({"train": tokens}, {"train": domain_N}, [f"d{i}" for i in range(num_domains)], 97, "fp",
                        "tok", "test")


def test_single_domain_starts_match_a_brute_force_scan():
    gen = torch.Generator().manual_seed(0)
    runs = torch.randint(1, 12, (60,), generator=gen)
    labels = torch.randint(-1, 3, (60,), generator=gen)  # -1: unlabelled stretches
    domain_N = torch.repeat_interleave(labels, runs)
    seq_len = 5
    found = single_domain_starts(domain_N, seq_len, 3)
    for d in range(3):
        expected = [p for p in range(domain_N.numel() - seq_len - 1)
                    if bool((domain_N[p:p + seq_len + 1] == d).all())]
        assert found[d].tolist() == expected


def test_by_domain_micro_batches_hold_one_domain_drawn_in_proportion_to_its_windows():
    domain_N = torch.cat([torch.full((n,), d) for d, n in ((0, 3000), (1, 1000), (2, 6000), (0, 2000))])
    data = labelled(domain_N, 3)
    seq_len, draws = 16, 3000
    seen = torch.zeros(3)
    for i in range(draws):
        batch = data.sample("train", 4, torch.Generator().manual_seed(i), seq_len, batching="by_domain")
        x, y, dom = batch.inputs
        assert dom.unique().numel() == 1  # one domain per micro-batch
        assert torch.equal(y[:, :-1], x[:, 1:])  # still next-token windows
        seen[int(dom[0, 0])] += 1
    windows = torch.tensor([len(s) for s in single_domain_starts(domain_N, seq_len, 3)], dtype=torch.float)
    expected = windows / windows.sum() * draws
    assert stats.chisquare(seen.numpy(), expected.numpy()).pvalue > 1e-3
    mixed = data.sample("train", 64, torch.Generator().manual_seed(0), seq_len).inputs[2]
    assert mixed[:, 0].unique().numel() > 1  # random windows mix domains


def test_by_domain_needs_labels():
    data = labelled(torch.full((500,), -1), 0)
    with pytest.raises(ValueError, match="by_domain needs domain labels"):
        data.sample("train", 2, torch.Generator(), 8, batching="by_domain")


def test_the_default_order_keeps_every_existing_cell_id_and_by_domain_is_part_of_it():
    study = load_study(REPO / "studies" / "quickstart.yaml")
    # The quickstart's ids before the option existed (bench/results/orchestration_cpu2_baseline.json).
    assert {c.id for c in expand(study)} == {"7c14164707aa", "f02f85fe319e", "589624b3442b", "3156216b28bb"}
    raw = yaml.safe_load((REPO / "studies" / "quickstart.yaml").read_text())
    raw["training"]["batching"] = "by_domain"
    by_domain = {c.id for c in expand(parse_study(raw))}
    assert by_domain.isdisjoint({c.id for c in expand(study)})
