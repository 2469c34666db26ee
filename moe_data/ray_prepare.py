"""Preparation of a hub or local LM dataset as a Ray Data job: rows are read and tokenized in parallel (`map_batches`
on every node's CPUs), and the driver appends the tokenized documents, in the source's order, to the split's shards
until each token budget is met. Memory on the driver: a few batches in flight, whatever the corpus size.

Local parquet / jsonl files are read with `ray.data.read_parquet` / `read_json`, one read task per file (a cluster
tokenizes them on all its nodes). Hub datasets and save_to_disk folders go through `ray.data.from_huggingface`: a hub
dataset with parquet files is read in parallel by Ray; any other IterableDataset by one streaming task, whose rows
are tokenized by tasks spread over the cluster.
"""
from __future__ import annotations

import logging
import os
from functools import lru_cache
from pathlib import Path

import numpy as np

from moe_data.prepare import building
from moe_data.shards import INDEX
from moe_data.sources import SplitSource, local_files, hashed_split, open_splits, parse_name
from moe_data.spec import SPLITS, DataSpec
from moe_data.token_sink import TokenSink
from moe_data.tokenizer import EOS, TextSample, pretrained_tokenizer, train_or_load_tokenizer

ROWS_PER_BATCH = 512
# Ray Data's block size for this job: a streamed read hands rows on in blocks of this size (its default, 128 MiB,
# would read that much before the first token is written), and each tokenizing task takes about one block.
BLOCK_BYTES = 16 * 2**20


@lru_cache(maxsize=2)
def _tokenizer(tokenizer_json: str):
    """Built once per Ray worker process (a BPE of 50k merges takes a while to parse)."""
    from tokenizers import Tokenizer

    return Tokenizer.from_str(tokenizer_json)


def domain_labels(batch: dict[str, np.ndarray], domain_column: str | None, rows: int) -> list[str]:
    """Each row's domain: a column, or a field inside one (`meta.redpajama_set_name`, SlimPajama's layout); "" where
    there is none."""
    top, *inner = (domain_column or "").split(".")
    if not top or top not in batch:
        return [""] * rows
    values = list(batch[top])
    for key in inner:
        values = [v.get(key) if isinstance(v, dict) else None for v in values]
    return ["" if v is None else str(v) for v in values]


def tokenize_rows(batch: dict[str, np.ndarray], *, tokenizer_json: str, text_column: str, domain_column: str | None,
                  split: str | None) -> dict[str, np.ndarray]:
    """One batch of rows -> (split, domain, ids) per document. Ray's tasks are the parallelism (one CPU each): the
    tokenizer's own threads on top would oversubscribe the cores."""
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    if text_column not in batch:
        raise ValueError(f"datasets[].text_column: the data has no column {text_column!r}; columns: "
                         f"{', '.join(batch)}")
    texts = [str(t) for t in batch[text_column]]
    encoded = _tokenizer(tokenizer_json).encode_batch(texts)
    domains = domain_labels(batch, domain_column, len(texts))
    splits = [split or hashed_split(t) for t in texts]
    ids = np.empty(len(texts), dtype=object)
    ids[:] = [np.asarray(e.ids, dtype=np.int32) for e in encoded]
    return {"split": np.array(splits), "domain": np.array(domains), "ids": ids}


def prepare_streamed(spec: DataSpec, cache_dir: Path) -> Path:
    folder = cache_dir / f"tokens-{spec.key()}"
    if (folder / INDEX).exists():
        return folder
    sources = open_splits(spec)
    if spec.tokenizer is None:
        tok, tok_path = train_or_load_tokenizer(training_sample(spec, sources), spec.vocab_size, cache_dir)
        eos = tok.token_to_id(EOS)
    else:
        (tok, eos), tok_path = pretrained_tokenizer(spec.tokenizer), spec.tokenizer
    _ensure_ray()
    with building(folder) as tmp:
        sink = TokenSink(tmp, spec, tok.get_vocab_size(), eos)
        for source in sources:
            fed = SPLITS if source.split is None else (source.split,)
            if all(sink.full(s) for s in fed):
                continue
            for batch in _tokenized(spec, source, tok.to_str()):
                for split, domain, ids in zip(batch["split"], batch["domain"], batch["ids"]):
                    sink.add(str(split), ids, str(domain) if domain != "" else None)
                if all(sink.full(s) for s in fed):
                    break  # leaving the iterator stops the Ray Data job: nothing past the budget is read
        sink.finish(str(tok_path), spec.name)
    return folder


def _tokenized(spec: DataSpec, source: SplitSource, tokenizer_json: str):
    import ray.data

    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True  # the source's order: shards reproducible run to run
    context.enable_progress_bars = False  # the study prints its own progress; Ray Data's goes to its logs
    context.target_max_block_size = BLOCK_BYTES
    logging.getLogger("ray.data").setLevel(logging.WARNING)
    rows = _read(spec, source)
    # Local files: a read task per file, and tokenizing fused into it. A stream: one read task, and the tokenizing
    # tasks kept apart from it (a remote-args function prevents Ray Data's fusion), spread over the cluster's nodes.
    spread = {} if rows is not None else {"ray_remote_args_fn": _spread}
    if rows is None:
        rows = _from_iterable(source.rows, hub=parse_name(spec.name)[0] == "hf")
    kwargs = {"tokenizer_json": tokenizer_json, "text_column": spec.text_column, "domain_column": spec.domain_column,
              "split": source.split}
    tokenized = rows.map_batches(tokenize_rows, fn_kwargs=kwargs, batch_size=ROWS_PER_BATCH, batch_format="numpy",
                                 **spread)
    yield from tokenized.iter_batches(batch_size=None, batch_format="numpy", prefetch_batches=2)


def _read(spec: DataSpec, source: SplitSource):
    """Local parquet / jsonl files read by Ray's own readers (a read task per file); None for anything else."""
    import ray.data

    scheme, rest = parse_name(spec.name)
    if scheme != "file":
        return None
    found = local_files(rest)
    if isinstance(found, Path) or found[0].suffix not in (".parquet", ".jsonl"):
        return None
    columns = [c.split(".")[0] for c in (spec.text_column, spec.domain_column) if c]
    paths = [str(p) for p in found]
    if found[0].suffix == ".parquet":
        present = set(ray.data.read_parquet(paths[:1]).schema().names)
        return ray.data.read_parquet(paths, columns=[c for c in columns if c in present])
    return ray.data.read_json(paths, lines=True)


def _spread() -> dict[str, str]:
    return {"scheduling_strategy": "SPREAD"}


def _from_iterable(rows, hub: bool):
    """A hub dataset through `from_huggingface`, which reads the hub's parquet files in parallel where it has them
    (else it streams). A local IterableDataset (a save_to_disk folder) by Ray's streaming Hugging Face datasource
    directly: `from_huggingface` would first ask the hub about a dataset that is not there."""
    import ray.data

    if hub:
        return ray.data.from_huggingface(rows)
    # Internal path, the datasource `from_huggingface` itself falls back on (Ray 2.60).
    from ray.data._internal.datasource.huggingface_datasource import HuggingFaceDatasource

    # One block stream, passed on as it is read (not split into blocks after the task ends).
    return ray.data.read_datasource(HuggingFaceDatasource(dataset=rows, batch_size=ROWS_PER_BATCH),
                                    override_num_blocks=1)


def training_sample(spec: DataSpec, sources: list[SplitSource]):
    """The first training documents of the stream, up to `tokenizer_sample_chars`: a BPE needs text before anything
    can be tokenized, and a corpus of hundreds of GB is not read twice."""
    texts, chars = [], 0
    for source in sources:
        for row in source.rows:
            text = str(row[spec.text_column])
            if (source.split or hashed_split(text)) == "train":
                texts.append(text)
                chars += len(text)
                if chars >= spec.tokenizer_sample_chars:
                    return TextSample(f"sample-{spec.key()}", texts)
        if source.split == "train":
            break
    return TextSample(f"sample-{spec.key()}", texts)


def _ensure_ray() -> None:
    """Inside a study the driver has joined its Ray already; a bare call (a test, the benchmark) starts a local one."""
    import ray

    if not ray.is_initialized():
        ray.init(address="local", include_dashboard=False, logging_level="WARNING", log_to_driver=False)
