"""Resolve a dataset name from the study file to where its rows come from, without reading them.

  builtin:<name>  offline corpora shipped with every Python install (moe_data/builtin.py), small, read in memory
  hf:<name>       a Hugging Face hub dataset through datasets.load_dataset (needs a network); `streaming: true`
                  downloads nothing beyond the budget
  file:<path>     local data: a parquet / jsonl / json / txt file or glob (`data/*.parquet`), or a folder written by
                  `Dataset.save_to_disk` / `DatasetDict.save_to_disk`

Every non-built-in source is opened as Hugging Face IterableDatasets, one per split it has, so no row is read until
preparation streams it (moe_data/ray_prepare.py), and nothing is held whole in memory.
"""
from __future__ import annotations

import glob
import hashlib
from dataclasses import dataclass
from pathlib import Path

from moe_data.builtin import BUILTIN, SUMMARIZATION_BUILTINS
from moe_data.corpus import split_of
from moe_data.spec import SPLITS, DataSpec

SCHEMES = ("builtin", "hf", "file")
_FILE_BUILDERS = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".txt": "text"}


def parse_name(name: str) -> tuple[str, str]:
    scheme, sep, rest = name.partition(":")
    if not sep or scheme not in SCHEMES or not rest:
        raise ValueError(f"dataset name {name[:100]!r} must be one of {', '.join(s + ':...' for s in SCHEMES)}")
    if scheme == "builtin" and rest not in BUILTIN:
        raise ValueError(f"unknown built-in dataset {rest[:100]!r}; valid: {', '.join('builtin:' + b for b in BUILTIN)}")
    if scheme == "file":
        local_files(rest)  # raises when there is nothing to read
    return scheme, rest


def local_files(rest: str) -> list[Path] | Path:
    """The files a `file:` name matches (sorted), or the save_to_disk folder it names."""
    path = Path(rest)
    try:
        if path.is_dir():
            if not any((path / marker).exists() for marker in ("dataset_info.json", "dataset_dict.json")):
                raise ValueError(f"file dataset {rest[:100]!r} is a folder, but not one written by save_to_disk "
                                 "(no dataset_info.json / dataset_dict.json)")
            return path
    except OSError as err:  # a name longer than the OS allows, and the like
        raise ValueError(f"file dataset {rest[:100]!r}: {err.strerror or err}") from None
    if path.suffix not in _FILE_BUILDERS:
        raise ValueError(f"file dataset {rest[:100]!r}: suffix must be one of {', '.join(_FILE_BUILDERS)} "
                         "(or name a save_to_disk folder)")
    files = sorted(Path(p) for p in glob.glob(rest) if Path(p).is_file())
    if not files:
        raise ValueError(f"file dataset {rest[:100]!r} matches no file")
    return files


def local_files_stamp(name: str) -> list[tuple[str, int, int]]:
    """(path, size, mtime) of a `file:` dataset's files: what keys its prepared copy short of reading it."""
    scheme, rest = name.partition(":")[::2]
    if scheme != "file":
        return []
    found = local_files(rest)
    files = sorted(p for p in found.rglob("*") if p.is_file()) if isinstance(found, Path) else found
    return [(str(p.resolve()), (s := p.stat()).st_size, int(s.st_mtime)) for p in files]


def task_of(name: str, summary_column: str | None) -> str:
    """'summarization' for (document, summary) pair datasets, else 'lm' (token windows)."""
    scheme, rest = parse_name(name)
    return "summarization" if summary_column or (scheme == "builtin" and rest in SUMMARIZATION_BUILTINS) else "lm"


@dataclass
class SplitSource:
    """One split of a non-built-in dataset as a Hugging Face IterableDataset. `split` None: the dataset has one split
    only, and each row's moelab split is decided by a hash of its text."""
    split: str | None
    rows: object  # datasets.IterableDataset


def open_splits(spec: DataSpec) -> list[SplitSource]:
    """The dataset's splits that moelab uses, opened lazily, in train/validation/test order."""
    import datasets  # heavy import, only for the paths that need it

    scheme, rest = parse_name(spec.name)
    if scheme == "hf":
        loaded = datasets.load_dataset(rest, spec.hf_config, revision=spec.revision, streaming=spec.streaming)
    else:
        found = local_files(rest)
        if isinstance(found, Path):
            loaded = datasets.load_from_disk(str(found))
        else:
            loaded = datasets.load_dataset(_FILE_BUILDERS[found[0].suffix], data_files=[str(p) for p in found],
                                           streaming=True)
    if not isinstance(loaded, (datasets.DatasetDict, datasets.IterableDatasetDict)):
        loaded = {"train": loaded}
    own = {split: loaded[spec.source_name(split)] for split in SPLITS if spec.source_name(split) in loaded}
    if "train" not in own:
        raise ValueError(f"{spec.name}: no split {spec.source_name('train')!r} for training; the dataset has "
                         f"{', '.join(loaded)} (map it with datasets[].splits)")
    sources = [SplitSource(split if len(own) > 1 else None, _iterable(rows)) for split, rows in own.items()]
    missing = [s for s in SPLITS if s not in own]
    if len(own) > 1 and missing:
        raise ValueError(f"{spec.name}: has splits {', '.join(own)} but no {', '.join(missing)} "
                         f"(map the dataset's own split names with datasets[].splits)")
    for source in sources:
        _check_columns(spec, source.rows)
    return sources


def _iterable(rows):
    """A memory-mapped Dataset is read as an IterableDataset too: preparation streams it either way."""
    import datasets

    return rows.to_iterable_dataset(num_shards=min(64, max(1, len(rows) // 1024))) \
        if isinstance(rows, datasets.Dataset) else rows


def _check_columns(spec: DataSpec, rows) -> None:
    columns = rows.column_names
    if columns is None:  # a generator-backed stream without features: checked as its rows arrive (tokenize_rows)
        return
    needed = [c for c in (spec.text_column, spec.summary_column) if c]
    absent = [c for c in needed if c not in columns]
    if absent:
        field = "text_column" if spec.text_column in absent else "summary_column"
        raise ValueError(f"datasets[].{field}: {spec.name} has no column {absent[0]!r}; columns: {', '.join(columns)}")
    if spec.domain_mix is not None and (spec.domain_column is None or spec.domain_column.split(".")[0] not in columns):
        raise ValueError(f"datasets[].domain_mix needs a domain column; {spec.name} has no column "
                         f"{spec.domain_column!r} (columns: {', '.join(columns)})")


def hashed_split(text: str) -> str:
    """A single-split dataset's 90/5/5 split, by a hash of the document's text: independent of row order, so a
    parallel reader assigns every row the same split as a sequential one."""
    return split_of(hashlib.sha1(text.encode("utf-8", "replace")).hexdigest())
