"""A text corpus: documents with optional domain labels, split train/validation/test, with a content fingerprint."""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Iterator

from moe_data.spec import SPLITS  # noqa: F401 (re-exported: the corpora split by it)


@dataclass(frozen=True)
class Document:
    doc_id: str
    text: str
    domain: str | None  # None where the source has no domain labels


@dataclass
class Corpus:
    splits: dict[str, list[Document]]
    source: str  # how it was loaded, e.g. "builtin:domains"

    @property
    def domains(self) -> list[str]:
        found = {d.domain for docs in self.splits.values() for d in docs if d.domain is not None}
        return sorted(found)

    @property
    def fingerprint(self) -> str:
        """sha256 over every document's split, id, domain and text: changes iff the data changes."""
        h = hashlib.sha256(self.source.encode())
        for split in SPLITS:
            for doc in self.splits.get(split, []):
                h.update(f"\0{split}\0{doc.doc_id}\0{doc.domain}\0".encode())
                h.update(hashlib.sha256(doc.text.encode()).digest())
        return h.hexdigest()[:16]

    def training_texts(self) -> Iterator[str]:
        return (d.text for d in self.splits["train"])


def split_of(doc_id: str) -> str:
    """Deterministic 90/5/5 split by a hash of the document id (stable across machines and runs)."""
    bucket = int(hashlib.sha1(doc_id.encode()).hexdigest(), 16) % 100
    return "train" if bucket < 90 else "validation" if bucket < 95 else "test"
