"""What the standard-library pair sources share: its modules in a stable order, and the per-split character budget."""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Callable, Iterator

from moe_data.corpus import SPLITS, split_of
from moe_data.pairs import Pair, PairCorpus


def stdlib_modules(root: Path) -> list[Path]:
    paths = (p for p in root.rglob("*.py")
             if "site-packages" not in p.parts and not any("test" in part for part in p.relative_to(root).parts))
    # Hash order, not alphabetical: a budget then samples across the whole library.
    return sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def budgeted_pairs(pairs_of: Callable[[str, str], Iterator[Pair]], max_chars: int, source: str,
                   key: Callable[[Pair], str]) -> PairCorpus:
    """Pairs of every module until each split holds its share (90/5/5) of `max_chars` document characters; split by
    pair id; a pair whose `key` was seen is skipped (the stdlib has a few verbatim copies)."""
    root = Path(sysconfig.get_paths()["stdlib"])
    budget = {"train": 0.90 * max_chars, "validation": 0.05 * max_chars, "test": 0.05 * max_chars}
    splits: dict[str, list[Pair]] = {s: [] for s in SPLITS}
    used = dict.fromkeys(SPLITS, 0)
    seen: set[str] = set()
    for path in stdlib_modules(root):
        module = ".".join(path.relative_to(root).with_suffix("").parts)
        for pair in pairs_of(module, path.read_text(encoding="utf-8", errors="replace")):
            split = split_of(pair.pair_id)
            if used[split] >= budget[split] or key(pair) in seen:
                continue
            seen.add(key(pair))
            splits[split].append(pair)
            used[split] += len(pair.document)
        if all(used[s] >= budget[s] for s in SPLITS):
            break
    return PairCorpus(splits, source=source)
