"""Real corpora: local parquet / jsonl / save_to_disk data and a streamed IterableDataset prepared by the Ray Data
job into token shards, under exact budgets; the shards hold exactly the tokenizer's ids; preparation is reproducible;
the fixed evaluation set is the same for every cell; bad input names its field."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from moe_data import ray_prepare
from moe_data.prepare import load_prepared, prepare
from moe_data.sources import hashed_split
from moe_data.spec import SPLITS, DataSpec
from moe_data.token_sink import DataBudgetWarning
from moe_data.tokenizer import EOS
from tests.streams import documents, logged_rows

@pytest.fixture(scope="module")
def ray_local():
    """One local Ray for the module's Ray Data jobs, stopped on every path."""
    import ray

    ray.init(address="local", num_cpus=2, include_dashboard=False, logging_level="WARNING", log_to_driver=False)
    try:
        yield
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def parquet_corpus(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    folder = tmp_path_factory.mktemp("parquet")
    rows = documents(3000)
    for i in range(3):  # three files: three read tasks
        pq.write_table(pa.Table.from_pylist(rows[i * 1000:(i + 1) * 1000]), folder / f"part-{i}.parquet")
    return folder, rows


def split_tokens(data, split: str) -> np.ndarray:
    return data.split(split).contiguous(0, data.split(split).num_tokens)[0]


def test_budgets_are_honoured_exactly_and_shards_hold_the_tokenizers_ids(ray_local, parquet_corpus, tmp_path):
    folder, rows = parquet_corpus
    spec = DataSpec(f"file:{folder}/*.parquet", 300, domain_column="topic", train_tokens=20_000, eval_tokens=1_500)
    data = load_prepared(prepare(spec, tmp_path))
    assert {s: data.split(s).num_tokens for s in SPLITS} == {"train": 20_000, "validation": 1_500, "test": 1_500}
    assert data.index.token_dtype == "uint16" and data.vocab_size == 300
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(data.tokenizer_path)
    eos = tok.token_to_id(EOS)
    for split in SPLITS:  # the rows of that split, in file order, each followed by EOS, cut at the budget
        expected = [i for r in rows if hashed_split(r["text"]) == split for i in tok.encode(r["text"]).ids + [eos]]
        assert split_tokens(data, split).tolist() == expected[:data.split(split).num_tokens]
    assert sorted(data.domains) == ["code", "law", "news"]
    counts = np.bincount(split_tokens(data, "train"), minlength=300)
    assert np.array_equal(data.train_token_counts().numpy(), counts)


def test_a_domain_mix_gives_each_domain_its_exact_share(ray_local, parquet_corpus, tmp_path):
    folder, _ = parquet_corpus
    spec = DataSpec(f"file:{folder}/*.parquet", 300, domain_column="topic", train_tokens=9_001, eval_tokens=600,
                    domain_mix=(("news", 2.0), ("code", 1.0)))
    data = load_prepared(prepare(spec, tmp_path))
    for split, budget in (("train", 9_001), ("validation", 600)):
        dom = data.split(split).contiguous(0, data.split(split).num_tokens)[1]
        per_domain = {data.domains[d]: int((dom == d).sum()) for d in np.unique(dom)}
        assert per_domain == spec.domain_budgets(split) and sum(per_domain.values()) == budget
    assert "law" not in data.domains


def test_a_domain_inside_a_struct_column_is_read_by_its_path(ray_local, parquet_corpus, tmp_path):
    """SlimPajama keeps its domain at meta.redpajama_set_name: the same corpus with the domain nested in a struct
    gives the same shards as with a flat column."""
    folder, rows = parquet_corpus
    nested = tmp_path / "nested"
    nested.mkdir()
    pq.write_table(pa.Table.from_pylist([{"text": r["text"], "meta": {"set": r["topic"], "n": 1}} for r in rows]),
                   nested / "part-0.parquet")
    budgets = dict(train_tokens=9_001, eval_tokens=600, domain_mix=(("news", 2.0), ("code", 1.0)))
    flat = load_prepared(prepare(DataSpec(f"file:{folder}/*.parquet", 300, domain_column="topic", **budgets),
                                 tmp_path / "flat"))
    inner = load_prepared(prepare(DataSpec(f"file:{nested}/*.parquet", 300, domain_column="meta.set", **budgets),
                                  tmp_path / "inner"))
    assert sorted(inner.domains) == sorted(flat.domains) == ["code", "news"]
    for split in SPLITS:
        a, b = (d.split(split).contiguous(0, d.split(split).num_tokens) for d in (flat, inner))
        assert np.array_equal(a[0], b[0])
        assert [flat.domains[i] for i in a[1][:50]] == [inner.domains[i] for i in b[1][:50]]


def test_preparation_is_cached_and_reproducible(ray_local, parquet_corpus, tmp_path):
    folder, _ = parquet_corpus
    spec = DataSpec(f"file:{folder}/*.parquet", 300, train_tokens=8_000, eval_tokens=500)
    first = prepare(spec, tmp_path / "a")
    assert prepare(spec, tmp_path / "a") == first  # found, not rebuilt
    again = prepare(spec, tmp_path / "b")  # rebuilt from scratch: the same bytes, the same draws
    a, b = load_prepared(first), load_prepared(again)
    assert a.fingerprint == b.fingerprint
    for split in SPLITS:
        assert np.array_equal(split_tokens(a, split), split_tokens(b, split))
    draw = [d.sample("train", 4, torch.Generator().manual_seed(7), 32).inputs[0] for d in (a, b)]
    assert torch.equal(*draw)


def test_jsonl_and_save_to_disk_sources_give_the_same_shards_as_parquet(ray_local, parquet_corpus, tmp_path):
    import datasets

    folder, rows = parquet_corpus
    jsonl = tmp_path / "docs.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "saved"))
    budgets = {"train_tokens": 6_000, "eval_tokens": 400, "domain_column": "topic"}
    shards = [load_prepared(prepare(DataSpec(name, 300, **budgets), tmp_path / "cache"))
              for name in (f"file:{folder}/*.parquet", f"file:{jsonl}", f"file:{tmp_path / 'saved'}")]
    for split in SPLITS:
        first = split_tokens(shards[0], split)
        assert all(np.array_equal(first, split_tokens(s, split)) for s in shards[1:]), split


def test_a_streamed_iterable_dataset_is_read_once_and_only_up_to_the_budget(ray_local, tmp_path, monkeypatch):
    """The hub cannot be reached here: `load_dataset` is replaced by a local generator-backed IterableDataset with
    the hub's own train/validation/test splits. Each row is logged to a file as the generator yields it (the
    generator runs inside a Ray task)."""
    import datasets

    from tests.hf_tiny import _tokenizer

    log = tmp_path / "yielded.txt"
    total = 20_000
    streams = datasets.IterableDatasetDict({s: datasets.IterableDataset.from_generator(
        logged_rows, gen_kwargs={"split": s, "total": total, "log": str(log), "seconds_per_row": 5e-4}) for s in ("train", "dev", "test")})
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: streams)
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    # Ray asks the hub for the dataset's parquet files: here it has none, so Ray streams the dataset itself.
    monkeypatch.setattr(HuggingFaceDatasource, "list_parquet_urls_from_dataset", classmethod(lambda cls, ds: []))
    monkeypatch.setattr(ray_prepare, "BLOCK_BYTES", 2**18)  # a stream of 4 MB, read in blocks of ~1,000 rows
    _tokenizer(tmp_path / "tok")  # a pretrained tokenizer: nothing is read to train a BPE
    spec = DataSpec("hf:someone/huge", streaming=True, split_names=(("train", "train"), ("validation", "dev"),
                                                                    ("test", "test")),
                    train_tokens=5_000, eval_tokens=300, tokenizer=str(tmp_path / "tok"))
    log.write_text("")  # opening the splits peeks at no row: the columns come from the features
    data = load_prepared(prepare(spec, tmp_path / "cache"))
    assert {s: data.split(s).num_tokens for s in SPLITS} == {"train": 5_000, "validation": 300, "test": 300}
    yielded = log.read_text().split()
    assert len(yielded) == len(set(yielded))  # no row read twice
    for split in ("train", "dev", "test"):
        read = sum(1 for y in yielded if y.startswith(split + "/"))
        assert 0 < read < total / 4, (split, read)  # a few batches past the budget at most, never the whole stream


def test_a_missing_column_an_empty_split_and_a_short_corpus_are_named(ray_local, parquet_corpus, tmp_path):
    folder, _ = parquet_corpus
    with pytest.raises(ValueError, match="datasets\\[\\].text_column: .* has no column 'body'; columns: text, topic"):
        prepare(DataSpec(f"file:{folder}/*.parquet", 300, text_column="body"), tmp_path)
    with pytest.raises(ValueError, match="datasets\\[\\].domain_mix needs a domain column"):
        prepare(DataSpec(f"file:{folder}/*.parquet", 300, train_tokens=10, eval_tokens=10,
                         domain_mix=(("news", 1.0),)), tmp_path)
    with pytest.raises(ValueError, match="'train' split is empty"):
        prepare(DataSpec(f"file:{folder}/*.parquet", 300, domain_column="topic", train_tokens=1000, eval_tokens=100,
                         domain_mix=(("nope", 1.0),)), tmp_path)
    with pytest.warns(DataBudgetWarning, match="train_tokens asks for 10,000,000 train tokens, the data had"):
        data = load_prepared(prepare(DataSpec(f"file:{folder}/*.parquet", 300, train_tokens=10_000_000), tmp_path))
    assert data.split("train").num_tokens < 10_000_000


def test_budgets_apply_to_the_builtin_corpora_and_the_fixed_eval_set_covers_every_token_once(tmp_path):
    from workflows.cell.evaluation import eval_batches
    from workflows.cell.worker import Worker
    from workflows.study.cells import expand
    from workflows.study.loading import parse_study

    spec = DataSpec("builtin:domains", 300, 40_000, train_tokens=7_000, eval_tokens=2_000)
    data = load_prepared(prepare(spec, tmp_path))
    assert [data.split(s).num_tokens for s in SPLITS] == [7_000, 2_000, 2_000]
    study = parse_study({"name": "s", "seeds": [0, 1], "routers": [{"name": "topk", "k": 1}, {"name": "hash"}],
                         "models": [{"name": "gpt", "d_model": 32, "n_layers": 1, "n_heads": 2, "num_experts": 4,
                                     "expert_hidden": 32}],
                         "datasets": [{"name": "builtin:domains", "vocab_size": 300}],
                         "training": {"seq_len": 64, "micro_batch_size": 5}})
    cells = expand(study)
    sets = [[b.inputs for b in eval_batches(data, cell, Worker(0, 1, None, ""))] for cell in cells]
    assert all(len(s) == len(sets[0]) and all(torch.equal(x, y) for a, b in zip(s, sets[0]) for x, y in zip(a, b))
               for s in sets[1:])  # every cell (router, seed) is evaluated on the same windows
    targets = torch.cat([y.flatten() for _, y, _ in sets[0]])
    n = data.eval_windows("validation", 64) * 64
    assert n == (2_000 - 1) // 64 * 64
    assert torch.equal(targets, torch.from_numpy(split_tokens(data, "validation")[1:n + 1]))
    two = [list(eval_batches(data, cells[0], Worker(r, 2, None, ""))) for r in range(2)]
    assert len(two[0]) == len(two[1])  # ranks run the same number of forwards (expert parallelism's collectives)
    seen = sorted(tuple(x.tolist()) for batches in two for b in batches for x in b.inputs[0])
    assert len(seen) == 2 * (n // 64 // 2)
