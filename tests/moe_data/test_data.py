"""Offline data: domain-labelled corpus, deterministic splits, fingerprints, tokenizer, batches."""
import hashlib

import pytest
import torch

from moe_data.builtin import load_domains
from moe_data.corpus import SPLITS
from moe_data.prepare import load_prepared, prepare
from moe_data.sources import parse_name
from moe_data.spec import DataSpec
from moe_data.tokenizer import train_or_load_tokenizer


@pytest.fixture(scope="module")
def corpus():
    return load_domains(60_000)


def test_builtin_corpus_has_three_labelled_domains_in_every_split(corpus):
    assert corpus.domains == ["c", "english", "python"]
    for split in SPLITS:
        assert {d.domain for d in corpus.splits[split]} == {"c", "english", "python"}, split


def test_splits_are_disjoint_and_deterministic(corpus):
    ids = [{d.doc_id for d in corpus.splits[s]} for s in SPLITS]
    assert not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    again = load_domains(60_000)
    assert again.fingerprint == corpus.fingerprint
    assert load_domains(50_000).fingerprint != corpus.fingerprint


def test_domains_are_balanced_by_character_budget(corpus):
    chars = {dom: sum(len(d.text) for d in corpus.splits["train"] if d.domain == dom) for dom in corpus.domains}
    assert all(54_000 <= c <= 54_000 + 16_000 + 60_000 for c in chars.values())  # budget, overshoot < one doc


def test_tokenizer_round_trips_and_is_cached(corpus, tmp_path):
    tok, path = train_or_load_tokenizer(corpus, 512, tmp_path)
    text = "def f(x):\n    return x  # ünïcode\n"
    assert tok.decode(tok.encode(text).ids) == text
    assert tok.get_vocab_size() == 512
    again, again_path = train_or_load_tokenizer(corpus, 512, tmp_path)
    assert again_path == path and again.encode(text).ids == tok.encode(text).ids


def test_prepared_batches_are_shifted_windows_with_domains(tmp_path):
    path = prepare(DataSpec("builtin:domains", 512, 40_000), tmp_path)
    assert prepare(DataSpec("builtin:domains", 512, 40_000), tmp_path) == path  # cached by fingerprint
    data = load_prepared(path)
    x, y, dom = data.sample("train", 4, torch.Generator().manual_seed(0), 32).inputs
    assert x.shape == y.shape == dom.shape == (4, 32)
    assert torch.equal(x[:, 1:], y[:, :-1])
    assert set(dom.unique().tolist()) <= {0, 1, 2}
    x2, _, _ = data.sample("train", 4, torch.Generator().manual_seed(0), 32).inputs
    assert torch.equal(x, x2)


@pytest.mark.parametrize("name,message", [
    ("domains", "must be one of"), ("builtin:nope", "unknown built-in dataset"),
    ("file:/no/such.jsonl", "matches no file"), ("file:/tmp/x.csv", "suffix must be one of"),
])
def test_bad_dataset_names_are_rejected(name, message):
    with pytest.raises(ValueError, match=message):
        parse_name(name)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.numpy().tobytes())
    return h.hexdigest()[:16]


def test_the_shards_draw_what_the_in_memory_tensors_drew(tmp_path):
    """Recorded from the int64-tensor implementation the shards replaced (the quickstart's corpus): the same windows,
    random and by domain, the same token counts and the same validation tokens. Finished studies' data order, and
    so their resume, did not move."""
    data = load_prepared(prepare(DataSpec("builtin:domains", 1024, 300_000), tmp_path))
    gen = torch.Generator().manual_seed(5)
    assert digest(data.sample("train", 4, gen, 64).inputs) == "0694302256d4cdaa"
    assert digest(data.sample("train", 4, gen, 64, batching="by_domain").inputs) == "a431de68190333fa"
    assert digest([data.train_token_counts()]) == "edc3e037cc79ded5"
    validation = torch.from_numpy(data.split("validation").contiguous(0, data.split("validation").num_tokens)[0])
    assert digest([validation]) == "b9e08d760c18dff3"


def test_the_natural_mix_shares_the_curated_total_by_each_domains_size(corpus):
    from moe_data.builtin import _domain_sources, load_domains_natural

    natural = load_domains_natural(60_000)
    train = {d: sum(len(x.text) for x in natural.splits["train"] if x.domain == d) for d in natural.domains}
    sizes = {d: sum(len(x.text) for x in docs) for d, docs in _domain_sources().items()}
    assert max(sizes, key=sizes.get) == max(train, key=train.get) == "python"  # the library's sources dominate
    shares = {d: train[d] / sum(train.values()) for d in train}
    for d in train:  # each domain's share of the text follows its size (up to one document's overshoot)
        assert shares[d] == pytest.approx(sizes[d] / sum(sizes.values()), abs=0.05)
    curated = {d: sum(len(x.text) for x in corpus.splits["train"] if x.domain == d) for d in corpus.domains}
    assert max(curated.values()) / min(curated.values()) < 2 < max(train.values()) / min(train.values())
    assert sum(train.values()) == pytest.approx(0.9 * 3 * 60_000, rel=0.3)  # the same total budget
