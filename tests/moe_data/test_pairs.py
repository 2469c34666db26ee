"""Summarization pairs: the built-in docstrings dataset, hub-style column mapping, and teacher-forcing batches."""
import json

import pytest
import torch

from moe_data.corpus import SPLITS
from moe_data.docstrings import load_docstrings
from moe_data.prepare import load_prepared, prepare
from moe_data.prepared_pairs import IGNORE_INDEX, PreparedPairs
from moe_data.sources import task_of
from moe_data.spec import DataSpec


@pytest.fixture(scope="module")
def corpus():
    return load_docstrings(400_000)


def test_docstring_pairs_are_real_summaries_removed_from_their_documents(corpus):
    pairs = [p for split in SPLITS for p in corpus.splits[split]]
    assert len(pairs) > 200
    for pair in pairs:
        assert 4 <= len(pair.summary.split()) <= 40 and "\n" not in pair.summary
        assert pair.summary not in pair.document  # the model cannot copy the reference
        assert len(pair.document) >= 200
    urlparse = {p.pair_id: p for p in pairs}
    assert all(":" in pid for pid in urlparse)  # module:line:name


def test_docstring_splits_are_disjoint_deterministic_and_fingerprinted(corpus):
    ids = [{p.pair_id for p in corpus.splits[s]} for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert all(ids)
    assert load_docstrings(400_000).fingerprint == corpus.fingerprint
    assert load_docstrings(300_000).fingerprint != corpus.fingerprint


def test_task_of_dataset_names():
    assert task_of("builtin:docstrings", None) == "summarization"
    assert task_of("builtin:domains", None) == "lm"
    assert task_of("hf:xsum", "summary") == "summarization"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory) -> PreparedPairs:
    return load_prepared(prepare(DataSpec("builtin:docstrings", 512, 300_000), tmp_path_factory.mktemp("pairs")))


def test_teacher_forcing_batch_shifts_labels_and_pads_with_ignore(prepared):
    batch = prepared.collate("train", [0, 1, 2], source_len=40, target_len=10)
    src, src_valid, dec_in, labels = batch.inputs
    assert src.shape[1] <= 40 and src_valid.dtype == torch.bool
    eos = prepared.eos_id
    for b, i in enumerate([0, 1, 2]):
        n = int(src_valid[b].sum())
        assert torch.equal(src[b, :n], prepared._ids("source", "train", i)[:40])
        target = prepared._ids("target", "train", i)[:9]
        real = labels[b][labels[b] != IGNORE_INDEX]
        assert torch.equal(real, torch.cat([target, torch.tensor([eos])]))  # summary then EOS, at most 10
        assert dec_in[b, 0] == eos and torch.equal(dec_in[b, 1:len(real)], real[:-1])
    assert batch.num_targets == int((labels != IGNORE_INDEX).sum())


def test_sampling_is_a_function_of_the_generator(prepared):
    a = prepared.sample("train", 4, torch.Generator().manual_seed(3), 32, 8)
    b = prepared.sample("train", 4, torch.Generator().manual_seed(3), 32, 8)
    assert all(torch.equal(x, y) for x, y in zip(a.inputs, b.inputs))


def test_texts_ride_along_for_metrics(prepared):
    assert len(prepared.documents["test"]) == len(prepared.summaries["test"]) == prepared.num_pairs("test") > 0
    assert prepared.train_token_counts().sum() == prepared.source_tokens["train"].numel() + \
        prepared.target_tokens["train"].numel()


def test_local_jsonl_pairs_with_configured_columns(tmp_path):
    rows = [{"article": f"document {i} " + "words " * 40, "highlights": f"summary {i}"} for i in range(120)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = DataSpec(f"file:{path}", 300, text_column="article", summary_column="highlights")
    prepared = load_prepared(prepare(spec, tmp_path / "cache"))
    assert sum(prepared.num_pairs(s) for s in SPLITS) == 120
    assert prepared.summaries["train"][0].startswith("summary ")
    assert prepared.documents["train"][0].startswith("document ")
    with pytest.raises(ValueError, match="summary_column: .* has no column 'summary'"):
        prepare(DataSpec(f"file:{path}", 300, text_column="article", summary_column="summary"), tmp_path / "cache")
