"""Turn a dataset spec into token tensors on disk, once per (corpus fingerprint, vocab size).

Language-modelling corpora are handled here; summarization pairs in prepared_pairs.py. Both expose
`sample(split, batch_size, generator, seq_len, target_len) -> Batch`, so the training loop does not care which.

The driver prepares data before any cell starts; cell workers only `load_prepared` the file. Each split is the
concatenation of its documents' tokens (EOS between documents) with a parallel per-token domain id, so windows can
be sampled at any offset and still know each token's domain.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from moe_data.batch import Batch
from moe_data.corpus import SPLITS
from moe_data.pairs import PairCorpus
from moe_data.prepared_pairs import PreparedPairs, prepare_pairs
from moe_data.sources import load_corpus
from moe_data.tokenizer import EOS, pretrained_tokenizer, train_or_load_tokenizer

NO_DOMAIN = -1


@dataclass
class PreparedData:
    tokens: dict[str, torch.Tensor]  # split -> (N,) int64 token ids
    domain_ids: dict[str, torch.Tensor]  # split -> (N,) int64 domain index, NO_DOMAIN where unlabelled
    domains: list[str]
    vocab_size: int
    fingerprint: str  # corpus fingerprint (content) — logged with every run
    tokenizer_path: str
    source: str
    task: str = "lm"

    def to_dict(self) -> dict:
        return {k: v for k, v in self.__dict__.items() if not k.startswith("_")}  # no per-process caches

    def sample(self, split: str, batch_size: int, generator: torch.Generator, seq_len: int,
               target_len: int = 0, batching: str = "random") -> Batch:
        """batching: "random" windows, or "by_domain" (all windows of the micro-batch from one domain)."""
        if batching == "by_domain":
            x, y, dom = sample_domain_batch(self, split, batch_size, seq_len, generator)
        else:
            x, y, dom = sample_batch(self, split, batch_size, seq_len, generator)
        return Batch((x, y, dom), y.numel())

    def train_token_counts(self) -> torch.Tensor:
        """(V,) token-id frequencies of the training split (what a balanced hash table is built from)."""
        return torch.bincount(self.tokens["train"], minlength=self.vocab_size)


def prepare(name: str, vocab_size: int, max_chars_per_domain: int, cache_dir: Path, tokenizer: str | None = None,
            **source_kwargs) -> Path:
    """Build (or find) the prepared file for a dataset spec; returns its path. `tokenizer`: a pretrained checkpoint's
    tokenizer (folder or hub name) instead of a BPE trained on the corpus (vocab_size then does not apply)."""
    corpus = load_corpus(name, max_chars_per_domain, **source_kwargs)
    vocab_key = vocab_size if tokenizer is None else hashlib.sha256(tokenizer.encode()).hexdigest()[:12]
    path = cache_dir / f"data-{corpus.fingerprint}-{vocab_key}.pt"
    if path.exists():
        return path
    if isinstance(corpus, PairCorpus):
        if tokenizer is not None:
            raise ValueError("datasets[].tokenizer: summarization pairs are tokenized by a BPE trained on them")
        prepare_pairs(corpus, vocab_size, path, cache_dir)
        return path
    if tokenizer is None:
        tok, tok_path = train_or_load_tokenizer(corpus, vocab_size, cache_dir)
        eos = tok.token_to_id(EOS)
    else:
        (tok, eos), tok_path = pretrained_tokenizer(tokenizer), tokenizer
    domains = corpus.domains
    tokens, domain_ids = {}, {}
    for split in SPLITS:
        docs = corpus.splits[split]
        if not docs:
            raise ValueError(f"dataset {name!r} has no documents in its {split!r} split")
        encoded = tok.encode_batch([d.text for d in docs])
        ids, dom = [], []
        for doc, enc in zip(docs, encoded):
            ids.extend(enc.ids + [eos])
            dom.extend([domains.index(doc.domain) if doc.domain is not None else NO_DOMAIN] * (len(enc.ids) + 1))
        tokens[split], domain_ids[split] = torch.tensor(ids), torch.tensor(dom)
    data = PreparedData(tokens, domain_ids, domains, tok.get_vocab_size(), corpus.fingerprint, str(tok_path),
                        corpus.source)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save(data.to_dict(), tmp)
    tmp.replace(path)
    return path


def load_prepared(path: str | Path) -> PreparedData | PreparedPairs:
    # Prepared files may sit in a shared cache or bucket others write to: tensors, numbers and text only, never
    # pickled objects that would run code on load.
    fields = torch.load(path, weights_only=True)
    return PreparedPairs(**{k: v for k, v in fields.items() if k != "kind"}) if fields.get("kind") == "pairs" \
        else PreparedData(**fields)


def single_domain_starts(domain_N: torch.Tensor, seq_len: int, num_domains: int) -> list[torch.Tensor]:
    """Per domain, every start p whose window p..p+seq_len (seq_len+1 tokens) lies in that domain alone: the number
    of domain changes before p+seq_len equals the number before p."""
    changes = torch.cat([torch.zeros(1, dtype=torch.long), (domain_N[1:] != domain_N[:-1]).long().cumsum(0)])
    starts = torch.arange(domain_N.numel() - seq_len - 1)
    pure = changes[starts + seq_len] == changes[starts]
    return [starts[pure & (domain_N[starts] == d)] for d in range(num_domains)]


def sample_domain_batch(data: PreparedData, split: str, batch_size: int, seq_len: int,
                        generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Windows of one domain, the domain drawn in proportion to its windows: overall, each domain is seen as often
    as under random windows; only the grouping into micro-batches changes."""
    if not data.domains:
        raise ValueError("training.batching: by_domain needs domain labels, and this dataset has none")
    cache = data.__dict__.setdefault("_domain_starts", {})  # computed once per split and window length
    if (split, seq_len) not in cache:
        cache[split, seq_len] = single_domain_starts(data.domain_ids[split], seq_len, len(data.domains))
    per_domain = cache[split, seq_len]
    counts = torch.tensor([len(s) for s in per_domain], dtype=torch.float)
    if counts.sum() == 0:
        raise ValueError(f"training.batching: by_domain: no {split} window of seq_len+1={seq_len + 1} tokens lies "
                         "within one domain")
    domain = int(torch.multinomial(counts, 1, generator=generator))
    pool = per_domain[domain]
    starts = pool[torch.randint(0, len(pool), (batch_size,), generator=generator)]
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    window = data.tokens[split][idx]
    return window[:, :-1], window[:, 1:], data.domain_ids[split][idx[:, :-1]]


def sample_batch(data: PreparedData, split: str, batch_size: int, seq_len: int,
                 generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random windows of seq_len+1 tokens: (inputs_BS, targets_BS, domain_BS)."""
    tokens, dom = data.tokens[split], data.domain_ids[split]
    if tokens.numel() <= seq_len + 1:
        raise ValueError(f"{split} split has {tokens.numel()} tokens, fewer than seq_len+1={seq_len + 1}")
    starts = torch.randint(0, tokens.numel() - seq_len - 1, (batch_size,), generator=generator)
    idx = starts.unsqueeze(1) + torch.arange(seq_len + 1)
    window = tokens[idx]
    return window[:, :-1], window[:, 1:], dom[idx[:, :-1]]
