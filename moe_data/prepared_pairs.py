"""Summarization pairs as token tensors on disk, and their padded seq2seq batches.

Sources and targets of a split are stored ragged (flat tokens + offsets); texts stay beside them because metrics
(ROUGE, BLEU, extractiveness) compare generated text with the original document and reference, not with tokens.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from moe_data.batch import Batch
from moe_data.pairs import Pair, PairCorpus
from moe_data.sources import SplitSource, hashed_split, open_splits, parse_name
from moe_data.spec import SPLITS, DataSpec
from moe_data.token_sink import DataBudgetWarning
from moe_data.tokenizer import EOS, TextSample, train_or_load_tokenizer

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


def prepare_pairs(spec: DataSpec, cache_dir: Path) -> Path:
    """Build (or find) the prepared pairs of a summarization dataset spec: a built-in corpus, or rows streamed from a
    hub / local dataset up to the spec's token budgets (documents and summaries counted together, whole pairs)."""
    from moe_data.builtin import BUILTIN

    scheme, rest = parse_name(spec.name)
    if scheme == "builtin":
        corpus = BUILTIN[rest](spec.max_chars_per_domain)
        path = cache_dir / f"pairs-{corpus.fingerprint}-{spec.key()}.pt"
        if path.exists():
            return path
        tok, tok_path = train_or_load_tokenizer(corpus, spec.vocab_size, cache_dir)
        rows = ((split, pair) for split in SPLITS for pair in corpus.splits[split])
        source = corpus.source
    else:
        path = cache_dir / f"pairs-{spec.key()}.pt"
        if path.exists():
            return path
        sources = open_splits(spec)
        tok, tok_path = train_or_load_tokenizer(_training_sample(spec, sources), spec.vocab_size, cache_dir)
        rows = _rows(spec, sources)
        source = spec.name
    pairs, used, ran_out = _within_budgets(spec, tok, rows)
    for split in SPLITS:
        _check_budget(spec, split, pairs[split], used[split], ran_out[split])
    _write(PairCorpus(pairs, source), tok, tok_path, path)
    return path


def _pair_tokens(tok, pairs: list[Pair]) -> list[int]:
    docs = tok.encode_batch([p.document for p in pairs])
    sums = tok.encode_batch([p.summary for p in pairs])
    return [len(d.ids) + len(s.ids) for d, s in zip(docs, sums)]


def _rows(spec: DataSpec, sources: list[SplitSource]) -> Iterator[tuple[str, Pair]]:
    """(split, pair) of every row, streamed: a single-split dataset's rows are split by a hash of their document."""
    for source in sources:
        for i, row in enumerate(source.rows):
            document, summary = str(row[spec.text_column]), str(row[spec.summary_column])
            split = source.split or hashed_split(document)
            yield split, Pair(f"{source.split or 'all'}/{i}", document, summary)


def _training_sample(spec: DataSpec, sources: list[SplitSource]) -> TextSample:
    texts, chars = [], 0
    for split, pair in _rows(spec, sources):
        if split == "train":
            texts += [pair.document, pair.summary]
            chars += len(pair.document) + len(pair.summary)
            if chars >= spec.tokenizer_sample_chars:
                break
    return TextSample(f"sample-{spec.key()}", texts)


def _within_budgets(spec: DataSpec, tok, rows: Iterator[tuple[str, Pair]]
                    ) -> tuple[dict[str, list[Pair]], dict[str, int], dict[str, bool]]:
    """Pairs per split in the source's order, each split up to its budget (documents and summaries counted together,
    whole pairs); the tokens each split used; and whether it ran out of data before its budget was full. Pairs are
    tokenized in chunks, and only where a budget needs their length; the rows stop being read once every split is
    full."""
    pairs: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    full = dict.fromkeys(SPLITS, False)
    for chunk in _chunks(rows, 256):
        measured = [(split, pair) for split, pair in chunk if spec.budget(split) is not None and not full[split]]
        lengths = dict(zip(map(id, (pair for _, pair in measured)), _pair_tokens(tok, [p for _, p in measured])))
        for split, pair in chunk:
            if full[split]:
                continue
            n, budget = lengths.get(id(pair), 0), spec.budget(split)
            if budget is not None and used[split] + n > budget:
                full[split] = True
                continue
            pairs[split].append(pair)
            used[split] += n
        if all(full.values()):
            break
    return pairs, used, {s: not full[s] for s in SPLITS}


def _chunks(rows: Iterator, size: int) -> Iterator[list]:
    chunk = []
    for row in rows:
        chunk.append(row)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def _check_budget(spec: DataSpec, split: str, pairs: list[Pair], used: int, ran_out: bool) -> None:
    if not pairs:
        raise ValueError(f"dataset {spec.name!r} has no pairs in its {split!r} split (check datasets[].splits and "
                         "the budgets)")
    budget = spec.budget(split)
    if budget is not None and ran_out:
        if used < budget:
            field = "train_tokens" if split == "train" else "eval_tokens"
            warnings.warn(f"dataset {spec.name!r}: datasets[].{field} asks for {budget:,} {split} tokens, the data "
                          f"had {used:,} in whole pairs; using {used:,}", DataBudgetWarning, stacklevel=3)


def _write(corpus: PairCorpus, tok, tok_path: Path, path: Path) -> None:
    fields: dict[str, dict] = {k: {} for k in ("source_tokens", "source_offsets", "target_tokens", "target_offsets",
                                               "documents", "summaries", "pair_ids")}
    for split in SPLITS:
        pairs = corpus.splits[split]
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
