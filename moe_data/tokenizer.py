"""Byte-level BPE trained with HF `tokenizers` on the training split, cached by corpus fingerprint; or a pretrained
checkpoint's own tokenizer (`datasets[].tokenizer`), so its token ids mean what the checkpoint learned."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

EOS = "<|endoftext|>"  # also the decoder's start symbol and padding of summarization batches


class TrainingTexts(Protocol):
    """What a BPE is trained from: a Corpus, a PairCorpus, or a TextSample of a stream."""
    fingerprint: str

    def training_texts(self) -> Iterator[str]: ...


@dataclass
class TextSample:
    """The first training texts of a stream, up to a character budget: what a BPE is trained on when the corpus is
    too large to read twice. Its fingerprint is the dataset spec's key (the stream's content is not hashed)."""
    fingerprint: str
    texts: list[str]

    def training_texts(self) -> Iterator[str]:
        return iter(self.texts)


def train_or_load_tokenizer(corpus: TrainingTexts, vocab_size: int, cache_dir: Path) -> tuple[Tokenizer, Path]:
    path = cache_dir / f"bpe-{corpus.fingerprint}-{vocab_size}.json"
    if path.exists():
        return Tokenizer.from_file(str(path)), path
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[EOS], show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus.training_texts(), trainer)
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tok.save(str(tmp))
    tmp.replace(path)  # atomic: concurrent preparers never read half a file
    return tok, path


def pretrained_tokenizer(name: str) -> tuple[Tokenizer, int]:
    """(the fast tokenizer, its EOS id) of a local folder or hub name (cache first; the hub only with a network)."""
    from transformers import AutoTokenizer

    auto = AutoTokenizer.from_pretrained(name)
    backend = getattr(auto, "backend_tokenizer", None)
    if backend is None:
        raise ValueError(f"tokenizer {name!r} has no fast (tokenizers) version")
    eos = auto.eos_token_id if auto.eos_token_id is not None else auto.sep_token_id
    if eos is None:
        raise ValueError(f"tokenizer {name!r} has no EOS token to separate documents with")
    return backend, int(eos)
