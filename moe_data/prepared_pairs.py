"""Summarization pairs as token tensors on disk, and their padded seq2seq batches.

Sources and targets of a split are stored ragged (flat tokens + offsets); texts stay beside them because metrics
(ROUGE, BLEU, extractiveness) compare generated text with the original document and reference, not with tokens.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from moe_data.batch import Batch
from moe_data.corpus import SPLITS
from moe_data.pairs import PairCorpus
from moe_data.tokenizer import EOS, train_or_load_tokenizer

IGNORE_INDEX = -100  # label of padding positions: cross-entropy skips them


@dataclass
class PreparedPairs:
    source_tokens: dict[str, torch.Tensor]  # split -> flat int64 ids of every document
    source_offsets: dict[str, torch.Tensor]  # split -> (n+1,) document i is tokens[off[i]:off[i+1]]
    target_tokens: dict[str, torch.Tensor]
    target_offsets: dict[str, torch.Tensor]
    documents: dict[str, list[str]]
    summaries: dict[str, list[str]]
    pair_ids: dict[str, list[str]]
    vocab_size: int
    eos_id: int  # end of summary, decoder start symbol and padding
    fingerprint: str
    tokenizer_path: str
    source: str
    task: str = "summarization"
    tokenizer_json: str = ""  # the tokenizer itself: workers on other nodes decode without a second shared file

    @property
    def domains(self) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {**self.__dict__, "kind": "pairs"}

    def tokenizer(self):
        from tokenizers import Tokenizer

        return Tokenizer.from_str(self.tokenizer_json) if self.tokenizer_json else Tokenizer.from_file(self.tokenizer_path)

    def num_pairs(self, split: str) -> int:
        return len(self.pair_ids[split])

    def train_token_counts(self) -> torch.Tensor:
        """(V,) token-id frequencies of training documents and summaries (a balanced hash table's input)."""
        ids = torch.cat([self.source_tokens["train"], self.target_tokens["train"]])
        return torch.bincount(ids, minlength=self.vocab_size)

    def _ids(self, kind: str, split: str, i: int) -> torch.Tensor:
        tokens, offsets = getattr(self, f"{kind}_tokens")[split], getattr(self, f"{kind}_offsets")[split]
        return tokens[offsets[i]:offsets[i + 1]]

    def sources(self, split: str, indices: list[int], source_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(ids_BS, valid_BS): documents truncated to source_len, right-padded with EOS, and which positions are real."""
        rows = [self._ids("source", split, i)[:source_len] for i in indices]
        width = max(1, max(len(r) for r in rows))
        ids = torch.full((len(rows), width), self.eos_id, dtype=torch.long)
        valid = torch.zeros((len(rows), width), dtype=torch.bool)
        for b, row in enumerate(rows):
            ids[b, :len(row)], valid[b, :len(row)] = row, True
        return ids, valid

    def collate(self, split: str, indices: list[int], source_len: int, target_len: int) -> Batch:
        """Teacher forcing: labels = summary[:target_len-1] + EOS, decoder input = EOS + labels[:-1]."""
        src, src_valid = self.sources(split, indices, source_len)
        labels = [torch.cat([self._ids("target", split, i)[:target_len - 1], torch.tensor([self.eos_id])])
                  for i in indices]
        width = max(len(r) for r in labels)
        labels_BL = torch.full((len(indices), width), IGNORE_INDEX, dtype=torch.long)
        decoder_in_BL = torch.full((len(indices), width), self.eos_id, dtype=torch.long)
        for b, row in enumerate(labels):
            labels_BL[b, :len(row)] = row
            decoder_in_BL[b, 1:len(row)] = row[:-1]
        return Batch((src, src_valid, decoder_in_BL, labels_BL), int((labels_BL != IGNORE_INDEX).sum()))

    def sample(self, split: str, batch_size: int, generator: torch.Generator, seq_len: int,
               target_len: int, batching: str = "random") -> Batch:
        """Random pairs (with replacement); seq_len is the source truncation length."""
        indices = torch.randint(0, self.num_pairs(split), (batch_size,), generator=generator).tolist()
        return self.collate(split, indices, seq_len, target_len)


def prepare_pairs(corpus: PairCorpus, vocab_size: int, path: Path, cache_dir: Path) -> None:
    tok, tok_path = train_or_load_tokenizer(corpus, vocab_size, cache_dir)
    fields: dict[str, dict] = {k: {} for k in ("source_tokens", "source_offsets", "target_tokens", "target_offsets",
                                               "documents", "summaries", "pair_ids")}
    for split in SPLITS:
        pairs = corpus.splits[split]
        if not pairs:
            raise ValueError(f"dataset {corpus.source!r} has no pairs in its {split!r} split")
        for kind, texts in (("source", [p.document for p in pairs]), ("target", [p.summary for p in pairs])):
            encoded = [torch.tensor(e.ids, dtype=torch.long) for e in tok.encode_batch(texts)]
            fields[f"{kind}_tokens"][split] = torch.cat(encoded)
            fields[f"{kind}_offsets"][split] = torch.tensor([0] + [len(e) for e in encoded]).cumsum(0)
        fields["documents"][split] = [p.document for p in pairs]
        fields["summaries"][split] = [p.summary for p in pairs]
        fields["pair_ids"][split] = [p.pair_id for p in pairs]
    data = PreparedPairs(**fields, vocab_size=tok.get_vocab_size(), eos_id=tok.token_to_id(EOS),
                         fingerprint=corpus.fingerprint, tokenizer_path=str(tok_path), source=corpus.source,
                         tokenizer_json=tok.to_str())
    tmp = path.with_suffix(".tmp")
    torch.save(data.to_dict(), tmp)
    tmp.replace(path)
