"""Turn a dataset spec into token shards on disk (moe_data/shards.py), once per (content or source key, tokenizer,
budgets); and read them back lazily in the cell workers.

Language-modelling corpora are handled here; summarization pairs in prepared_pairs.py. Both expose
`sample(split, batch_size, generator, seq_len, target_len) -> Batch`, so the training loop does not care which.

The driver prepares data before any cell starts: the built-in corpora (a few MB) in this process, every other source
as a Ray Data job (moe_data/ray_prepare.py). Cell workers read the windows they draw from the shards (`load_prepared`). Each split is the
concatenation of its documents' tokens (EOS between documents) with a parallel per-token domain id, so windows can
be sampled at any offset and still know each token's domain.
"""
from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import torch

from moe_data.batch import Batch
from moe_data.prepared_pairs import PreparedPairs, prepare_pairs
from moe_data.shards import INDEX, NO_DOMAIN, ShardIndex, TokenSplit
from moe_data.sources import parse_name, task_of
from moe_data.spec import SPLITS, DataSpec
from moe_data.token_sink import COUNTS, TokenSink
from moe_data.tokenizer import EOS, pretrained_tokenizer, train_or_load_tokenizer

__all__ = ["NO_DOMAIN", "PreparedData", "load_prepared", "prepare"]
ENCODE_BATCH = 256  # documents per tokenizer call: large enough for its threads, small enough to stop at a budget


class PreparedData:
    """A prepared LM dataset: token shards on disk and their index. Nothing is read until a window is drawn."""
    task = "lm"

    def __init__(self, folder: str | Path):
        self.folder = Path(folder)
        self.index = ShardIndex.read(self.folder)
        self._splits: dict[str, TokenSplit] = {}
        self._domain_pools: dict[tuple[str, int], list[tuple[np.ndarray, np.ndarray]]] = {}

    vocab_size = property(lambda self: self.index.vocab_size)
    domains = property(lambda self: self.index.domains)
    fingerprint = property(lambda self: self.index.fingerprint)  # content of the shards, logged with every run
    tokenizer_path = property(lambda self: self.index.tokenizer_path)
    source = property(lambda self: self.index.source)

    def split(self, name: str) -> TokenSplit:
        if name not in self._splits:
            self._splits[name] = TokenSplit(self.folder, name, self.index)
        return self._splits[name]

    def sample(self, split: str, batch_size: int, generator: torch.Generator, seq_len: int,
               target_len: int = 0, batching: str = "random") -> Batch:
        """batching: "random" windows, or "by_domain" (all windows of the micro-batch from one domain). The draw is a
        pure function of the generator's state: resume replays it exactly."""
        data = self.split(split)
        places = self._domain_places(split, batch_size, seq_len, generator) if batching == "by_domain" \
            else self._random_places(data, split, batch_size, seq_len, generator)
        tokens, domains = data.windows(places, seq_len + 1)
        x, y = torch.from_numpy(tokens[:, :-1]), torch.from_numpy(tokens[:, 1:])
        return Batch((x, y, torch.from_numpy(domains[:, :-1])), y.numel())

    @staticmethod
    def _random_places(data: TokenSplit, split: str, batch_size: int, seq_len: int,
                       generator: torch.Generator) -> list[tuple[int, int]]:
        per_shard = data.window_starts(seq_len + 1)
        total = int(per_shard.sum())
        if total <= 0:
            raise ValueError(f"{split} split has {data.num_tokens} tokens, fewer than seq_len+1={seq_len + 1}")
        starts = torch.randint(0, total, (batch_size,), generator=generator).numpy()
        return data.locate(starts, per_shard)

    def _domain_places(self, split: str, batch_size: int, seq_len: int,
                       generator: torch.Generator) -> list[tuple[int, int]]:
        """Windows of one domain, the domain drawn in proportion to its windows: overall, each domain is seen as often
        as under random windows; only the grouping into micro-batches changes."""
        if not self.domains:
            raise ValueError("training.batching: by_domain needs domain labels, and this dataset has none")
        if (split, seq_len) not in self._domain_pools:
            self._domain_pools[split, seq_len] = single_domain_pools(self.split(split), seq_len, len(self.domains))
        pools = self._domain_pools[split, seq_len]
        counts = torch.tensor([float(ends[-1]) if len(ends) else 0.0 for _, ends in pools])
        if counts.sum() == 0:
            raise ValueError(f"training.batching: by_domain: no {split} window of seq_len+1={seq_len + 1} tokens lies "
                             "within one domain")
        domain = int(torch.multinomial(counts, 1, generator=generator))
        runs, ends = pools[domain]
        picks = torch.randint(0, int(ends[-1]), (batch_size,), generator=generator).numpy()
        at = np.searchsorted(ends, picks, side="right")
        return [(int(runs[r, 0]), int(runs[r, 1] + k - (ends[r] - runs[r, 2]))) for r, k in zip(at, picks)]

    def train_token_counts(self) -> torch.Tensor:
        """(V,) token-id frequencies of the training split (what a balanced hash table is built from)."""
        return torch.from_numpy(np.load(self.folder / COUNTS))

    def eval_windows(self, split: str, seq_len: int) -> int:
        """How many fixed evaluation windows the split holds: window i predicts tokens i*seq_len+1 .. (i+1)*seq_len,
        so every token of the split (but the first, and a tail shorter than a window) is a target exactly once."""
        return max(0, (self.split(split).num_tokens - 1) // seq_len)

    def eval_batch(self, split: str, windows: list[int], seq_len: int) -> Batch:
        rows = [self.split(split).contiguous(i * seq_len, seq_len + 1) for i in windows]
        tokens = torch.from_numpy(np.stack([t for t, _ in rows]))
        domains = torch.from_numpy(np.stack([d for _, d in rows]))
        return Batch((tokens[:, :-1], tokens[:, 1:], domains[:, :-1]), tokens[:, 1:].numel())


def single_domain_pools(data: TokenSplit, seq_len: int, num_domains: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Per domain, the windows of seq_len+1 tokens that lie in that domain alone, as runs: (R, 3) rows of (shard,
    first start, number of starts) and their cumulative counts. Memory grows with the number of domain runs, not
    with the number of tokens; the k-th start of a domain is the same as in the sorted list of all its starts."""
    per_domain: list[list[tuple[int, int, int]]] = [[] for _ in range(num_domains)]
    for shard, start, length, domain in data.domain_runs():
        last_start = min(start + length - 1 - seq_len, data.sizes[shard] - seq_len - 2)  # as random windows allow
        if domain != NO_DOMAIN and last_start >= start:
            per_domain[domain].append((shard, start, last_start - start + 1))
    pools = []
    for runs in per_domain:
        table = np.array(runs, dtype=np.int64).reshape(-1, 3)
        pools.append((table, np.cumsum(table[:, 2])))
    return pools


def prepare(spec: DataSpec, cache_dir: Path) -> Path:
    """Build (or find) the prepared data of a dataset spec; returns its path (a shard folder, or a pairs file)."""
    scheme, rest = parse_name(spec.name)
    if task_of(spec.name, spec.summary_column) == "summarization":
        return prepare_pairs(spec, cache_dir)
    if scheme != "builtin":
        from moe_data.ray_prepare import prepare_streamed

        return prepare_streamed(spec, cache_dir)
    from moe_data.builtin import BUILTIN

    corpus = BUILTIN[rest](spec.max_chars_per_domain)
    folder = cache_dir / f"tokens-{corpus.fingerprint}-{spec.key()}"
    if (folder / INDEX).exists():
        return folder
    if spec.tokenizer is None:
        tok, tok_path = train_or_load_tokenizer(corpus, spec.vocab_size, cache_dir)
        eos = tok.token_to_id(EOS)
    else:
        (tok, eos), tok_path = pretrained_tokenizer(spec.tokenizer), spec.tokenizer
    with building(folder) as tmp:
        sink = TokenSink(tmp, spec, tok.get_vocab_size(), eos, corpus.domains)
        for split in SPLITS:
            docs = corpus.splits[split]
            for lo in range(0, len(docs), ENCODE_BATCH):
                if sink.full(split):
                    break
                chunk = docs[lo:lo + ENCODE_BATCH]
                for doc, enc in zip(chunk, tok.encode_batch([d.text for d in chunk])):
                    sink.add(split, np.asarray(enc.ids), doc.domain)
        sink.finish(str(tok_path), corpus.source)
    return folder


class building:
    """A folder written under a temporary name and renamed into place when complete: a kill leaves no half-written
    folder under the final name, and concurrent preparers of the same data do not collide."""

    def __init__(self, folder: Path):
        self.folder = folder
        self.tmp = folder.with_name(f"{folder.name}.{os.getpid()}.tmp")

    def __enter__(self) -> Path:
        shutil.rmtree(self.tmp, ignore_errors=True)
        self.tmp.mkdir(parents=True)
        return self.tmp

    def __exit__(self, kind, *_) -> None:
        if kind is not None or (self.folder / INDEX).exists():
            shutil.rmtree(self.tmp, ignore_errors=True)
            return
        os.replace(self.tmp, self.folder)


def load_prepared(path: str | Path) -> PreparedData | PreparedPairs:
    # Prepared data may sit in a shared cache or bucket others write to: raw arrays, JSON, and tensors/numbers/text
    # loaded with weights_only, never pickled objects that would run code on load.
    path = Path(path)
    if path.is_dir():
        return PreparedData(path)
    fields = torch.load(path, weights_only=True)
    return PreparedPairs(**{k: v for k, v in fields.items() if k != "kind"})
