"""A summarization corpus: (document, summary) pairs split train/validation/test, with a content fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from moe_data.corpus import SPLITS


@dataclass(frozen=True)
class Pair:
    pair_id: str
    document: str
    summary: str


@dataclass
class PairCorpus:
    splits: dict[str, list[Pair]]
    source: str

    @property
    def domains(self) -> list[str]:
        return []  # pairs carry no domain labels

    @property
    def fingerprint(self) -> str:
        """sha256 over every pair's split, id, document and summary: changes iff the data changes."""
        h = hashlib.sha256(("pairs\0" + self.source).encode())
        for split in SPLITS:
            for pair in self.splits.get(split, []):
                h.update(f"\0{split}\0{pair.pair_id}\0".encode())
                h.update(hashlib.sha256(pair.document.encode()).digest())
                h.update(hashlib.sha256(pair.summary.encode()).digest())
        return h.hexdigest()[:16]

    def training_texts(self) -> Iterator[str]:
        """What the tokenizer is trained on: training documents and their summaries."""
        for pair in self.splits["train"]:
            yield pair.document
            yield pair.summary
