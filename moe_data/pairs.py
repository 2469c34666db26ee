"""A summarization corpus: (document, summary) pairs split train/validation/test, with a content fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from moe_data.corpus import SPLITS, split_of


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


def pairs_from_hf(loaded, source: str, document_column: str, summary_column: str) -> PairCorpus:
    """A datasets.DatasetDict of (document, summary) rows; its own validation/test splits are kept where it has them
    (XSum, CNN/DailyMail), otherwise rows are split by a hash of their index."""
    splits: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    own_splits = set(loaded) & set(SPLITS) - {"train"}
    for split_name, ds in loaded.items():
        for column in (document_column, summary_column):
            if column not in ds.column_names:
                raise ValueError(f"{source}: no column {column!r}; columns: {', '.join(ds.column_names)} "
                                 "(set datasets[].document_column / summary_column)")
        for i, row in enumerate(ds):
            pair = Pair(f"{split_name}/{i}", str(row[document_column]), str(row[summary_column]))
            target = split_name if split_name in own_splits else split_of(pair.pair_id) if not own_splits else "train"
            if target in splits:
                splits[target].append(pair)
    return PairCorpus(splits, source)
