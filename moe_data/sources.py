"""Resolve a dataset name from the study file to a Corpus.

  builtin:<name>  offline corpora shipped with every Python install (moe_data/builtin.py)
  hf:<name>       the Hugging Face hub through datasets.load_dataset (needs a network)
  file:<path>     local jsonl / json / parquet / text files through datasets.load_dataset
"""
from __future__ import annotations

from pathlib import Path

from moe_data.builtin import BUILTIN, SUMMARIZATION_BUILTINS
from moe_data.corpus import SPLITS, Corpus, Document, split_of
from moe_data.pairs import PairCorpus, pairs_from_hf

SCHEMES = ("builtin", "hf", "file")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def parse_name(name: str) -> tuple[str, str]:
    scheme, sep, rest = name.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(f"dataset name {name[:100]!r} must be one of {', '.join(s + ':...' for s in SCHEMES)}")
    if scheme == "builtin" and rest not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {rest[:100]!r}; valid: {', '.join('builtin:' + b for b in BUILTIN)}")
    if scheme == "file":
        path = Path(rest)
        if path.suffix not in _FILE_BUILDERS:
            raise ValueError(f"file dataset {rest[:100]!r}: suffix must be one of {', '.join(_FILE_BUILDERS)}")
        try:
            found = path.is_file()
        except OSError as err:  # a name longer than the OS allows, and the like
            raise ValueError(f"file dataset {rest[:100]!r}: {err.strerror or err}") from None
        if not found:
            raise ValueError(f"file dataset {rest[:100]!r} does not exist (or is not a file)")
    return scheme, rest


def task_of(name: str, summary_column: str | None) -> str:
    """'summarization' for (document, summary) pair datasets, else 'lm' (token windows)."""
    scheme, rest = parse_name(name)
    return "summarization" if summary_column or (scheme == "builtin" and rest in SUMMARIZATION_BUILTINS) else "lm"


def load_corpus(name: str, max_chars_per_domain: int, text_column: str = "text",
                domain_column: str | None = "domain", hf_config: str | None = None,
                summary_column: str | None = None) -> Corpus | PairCorpus:
    """A summary column makes it a summarization dataset: (text_column, summary_column) pairs."""
    scheme, rest = parse_name(name)
    if scheme == "builtin":
        return BUILTIN[rest](max_chars_per_domain)
    import datasets  # heavy import, only for the paths that need it

    if scheme == "hf":
        loaded = datasets.load_dataset(rest, hf_config)
    else:
        loaded = datasets.load_dataset(_FILE_BUILDERS[Path(rest).suffix], data_files=str(Path(rest).resolve()))
    if summary_column:
        return pairs_from_hf(loaded, name, text_column, summary_column)
    return _from_hf(loaded, name, text_column, domain_column)


def _from_hf(loaded, source: str, text_column: str, domain_column: str | None) -> Corpus:
    """Keep the dataset's own splits where it has them; otherwise split by a hash of the row index."""
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    own_splits = set(loaded) & set(SPLITS) - {"train"}
    for split_name, ds in loaded.items():
        if text_column not in ds.column_names:
            raise ValueError(f"{source}: no text column {text_column!r}; columns: {', '.join(ds.column_names)}")
        has_domain = domain_column is not None and domain_column in ds.column_names
        for i, row in enumerate(ds):
            doc = Document(f"{split_name}/{i}", row[text_column], str(row[domain_column]) if has_domain else None)
            target = split_name if split_name in own_splits else split_of(doc.doc_id) if not own_splits else "train"
            if target in splits:
                splits[target].append(doc)
    return Corpus(splits, source=source)
