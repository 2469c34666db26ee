"""What the standard-library pair sources share: its modules in a stable order, and the per-split character budget."""
from __future__ import annotations

import hashlib
import sysconfig
from collections import Counter
from pathlib import Path
from typing import Callable, Iterable, Iterator

from moe_data.corpus import SPLITS, split_of
from moe_data.pairs import Pair, PairCorpus


def stdlib_modules(root: Path) -> list[Path]:
    paths = (p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and not any("test" in part for part in p.relative_to(root).parts))
    # Hash order, not alphabetical: a budget then samples across the whole library.
    return sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def module_name(path: Path, root: Path) -> str:
    return ".".join(path.relative_to(root).with_suffix("").parts)


def stdlib_named_modules() -> list[tuple[str, Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return [(module_name(path, root), path) for path in stdlib_modules(root)]


def budgeted_pairs(pairs_of: Callable[[str, str], Iterator[Pair]], max_chars: int, source: str,
                   key: Callable[[Pair], str], modules: Iterable[tuple[str, Path]] | None = None,
                   max_per_summary: int | None = None) -> PairCorpus:
    """Pairs of every module (default: the standard library's) until each split holds its share (90/5/5) of
    `max_chars` document characters; split by pair id; a pair whose `key` was seen is skipped (libraries hold
    verbatim copies), and so is one whose summary already has `max_per_summary` pairs (a `forward` per model)."""
    budget = {"train": 0.90 * max_chars, "validation": 0.05 * max_chars, "test": 0.05 * max_chars}
    splits: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    per_summary: Counter[str] = Counter()
    for module, path in stdlib_named_modules() if modules is None else modules:
        for pair in pairs_of(module, path.read_text(encoding="utf-8", errors="replace")):
            split = split_of(pair.pair_id)
            if used[split] >= budget[split] or key(pair) in seen:
                continue
            if max_per_summary is not None and per_summary[pair.summary] >= max_per_summary:
                continue
            per_summary[pair.summary] += 1
            seen.add(key(pair))
            splits[split].append(pair)
            used[split] += len(pair.document)
        if all(used[s] >= budget[s] for s in SPLITS):
            break
    return PairCorpus(splits, source=source)
