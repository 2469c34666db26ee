"""What to prepare: a dataset's source, its columns and splits, and how many tokens to take (the typed edge between the
study file's `datasets[]` entry and moe_data)."""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

SPLITS = ("train", "validation", "test")


@dataclass(frozen=True)
class DataSpec:
    name: str  # builtin:<name> | hf:<hub name> | file:<parquet/jsonl glob, or a save_to_disk folder>
    vocab_size: int = 2048  # of the BPE trained on the corpus (unused with `tokenizer`)
    max_chars_per_domain: int = 400_000  # built-in corpora only: how much text each domain contributes
    text_column: str = "text"
    domain_column: str | None = "domain"
    summary_column: str | None = None  # set for (document, summary) pair datasets
    hf_config: str | None = None
    revision: str | None = None
    streaming: bool = False  # read the hub dataset as an IterableDataset: nothing is downloaded beyond the budget
    # moelab split -> the dataset's own split name (e.g. validation: "dev"); a split the dataset lacks is carved out
    # of the first one by a hash of each document's text (90/5/5).
    split_names: tuple[tuple[str, str], ...] = (("train", "train"), ("validation", "validation"), ("test", "test"))
    train_tokens: int | None = None  # None: everything the source has
    eval_tokens: int | None = None  # each of validation and test
    domain_mix: tuple[tuple[str, float], ...] | None = None  # domain -> share of each budget; others are skipped
    tokenizer: str | None = None  # a pretrained checkpoint's tokenizer instead of a BPE trained on the corpus
    tokenizer_sample_chars: int = 50_000_000  # a BPE is trained on at most this much of the training text

    def budget(self, split: str) -> int | None:
        return self.train_tokens if split == "train" else self.eval_tokens

    def domain_budgets(self, split: str) -> dict[str, int] | None:
        """Each mixed domain's share of a split's budget, summing exactly to it (the remainder to the first ones)."""
        budget = self.budget(split)
        if self.domain_mix is None or budget is None:
            return None
        total = sum(w for _, w in self.domain_mix)
        shares = {d: int(budget * w // total) for d, w in self.domain_mix}
        for d, _ in self.domain_mix[:budget - sum(shares.values())]:
            shares[d] += 1
        return shares

    def source_name(self, split: str) -> str:
        return dict(self.split_names).get(split, split)

    def key(self) -> str:
        """What identifies the prepared result short of its content (which a stream cannot be hashed for before it is
        read): every field, and for local files their names, sizes and modification times."""
        from moe_data.sources import local_files_stamp

        fields = {**asdict(self), "files": local_files_stamp(self.name)}
        return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()[:16]
