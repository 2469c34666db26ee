"""Where tokenized documents go: each split's shards, under its token budget (per domain for a domain mix), with a
streamed content fingerprint and the training split's token counts. Memory: one document at a time, plus (V,) counts."""
from __future__ import annotations

import hashlib
import warnings
from pathlib import Path

import numpy as np

from moe_data.shards import MAX_DOMAINS, NO_DOMAIN, ShardIndex, SplitWriter
from moe_data.spec import SPLITS, DataSpec

COUNT_EVERY = 1 << 20  # training tokens buffered between two bincounts
COUNTS = "train.counts.npy"  # (V,) int64 token frequencies of the training split: a balanced hash table's input


class DataBudgetWarning(UserWarning):
    """A budget asked for more tokens than the data had; preparation used what there was."""


class TokenSink:
    def __init__(self, folder: Path, spec: DataSpec, vocab_size: int, eos_id: int, domains: list[str] | None = None):
        self.folder, self.spec, self.vocab_size, self.eos_id = folder, spec, vocab_size, eos_id
        self.domains: list[str] = list(domains or [d for d, _ in spec.domain_mix or ()])
        self.writers = {s: SplitWriter(folder, s, vocab_size) for s in SPLITS}
        self.per_domain = {s: spec.domain_budgets(s) for s in SPLITS}
        self.domain_written = {s: dict.fromkeys(self.domains, 0) for s in SPLITS}
        self.counts = np.zeros(vocab_size, dtype=np.int64)
        # Training ids waiting to be counted: one bincount per ~1M tokens, not one (V,) array per document.
        self._uncounted: list[np.ndarray] = []
        self._uncounted_tokens = 0
        self.hash = hashlib.sha256(f"{spec.name}\0{vocab_size}\0{eos_id}".encode())

    def room(self, split: str, domain: str | None) -> int | None:
        """Tokens this split (and domain, in a mix) may still take; None: unbounded."""
        budgets = self.per_domain[split]
        if budgets is not None:
            return budgets[domain] - self.domain_written[split][domain] if domain in budgets else 0
        budget = self.spec.budget(split)
        return None if budget is None else budget - self.writers[split].written

    def full(self, split: str) -> bool:
        budgets = self.per_domain[split]
        if budgets is not None:
            return all(self.room(split, d) <= 0 for d in budgets)
        room = self.room(split, None)
        return room is not None and room <= 0

    @property
    def done(self) -> bool:
        return all(self.full(s) for s in SPLITS)

    def add(self, split: str, ids: np.ndarray, domain: str | None) -> None:
        """One document's ids (without EOS): written with an EOS after it, cut at the budget."""
        room = self.room(split, domain)
        if room is not None and room <= 0:
            return
        ids = np.append(np.asarray(ids, dtype=np.int64), self.eos_id)
        if room is not None:
            ids = ids[:room]
        domain_id = self._domain_id(domain)
        self.writers[split].append(ids, domain_id)
        if domain in self.domain_written[split]:
            self.domain_written[split][domain] += len(ids)
        if split == "train":
            self._uncounted.append(ids)
            self._uncounted_tokens += len(ids)
            if self._uncounted_tokens >= COUNT_EVERY:
                self._count()
        self.hash.update(f"\0{split}\0{domain}\0".encode())
        self.hash.update(ids.astype(np.uint32).tobytes())

    def _count(self) -> None:
        if self._uncounted:
            self.counts += np.bincount(np.concatenate(self._uncounted), minlength=self.vocab_size)
        self._uncounted, self._uncounted_tokens = [], 0

    def _domain_id(self, domain: str | None) -> int:
        if domain is None:
            return NO_DOMAIN
        if domain not in self.domains:
            if len(self.domains) >= MAX_DOMAINS:
                raise ValueError(f"datasets[].domain_column: more than {MAX_DOMAINS} distinct domains (is it the "
                                 "right column?)")
            self.domains.append(domain)
            for split in SPLITS:
                self.domain_written[split].setdefault(domain, 0)
        return self.domains.index(domain)

    def finish(self, tokenizer_path: str, source: str) -> ShardIndex:
        for writer in self.writers.values():
            writer.close()
        for split in SPLITS:
            written, budget = self.writers[split].written, self.spec.budget(split)
            field = "train_tokens" if split == "train" else "eval_tokens"
            if written == 0:
                raise ValueError(f"dataset {self.spec.name!r}: its {split!r} split is empty (check datasets[].splits, "
                                 f"the text column, and datasets[].domain_mix)")
            if budget is not None and written < budget:
                warnings.warn(f"dataset {self.spec.name!r}: datasets[].{field} asks for {budget:,} {split} tokens, "
                              f"the data had {written:,}; using {written:,}", DataBudgetWarning, stacklevel=2)
        self._count()
        np.save(self.folder / COUNTS, self.counts)
        index = ShardIndex(self.vocab_size, self.domains, self.hash.hexdigest()[:16], tokenizer_path, source,
                           self.eos_id, str(self.writers["train"].tokens_dtype), "int8",
                           {s: w.shard_sizes for s, w in self.writers.items()},
                           {s: self.spec.budget(s) for s in SPLITS})
        index.write(self.folder)
        return index
