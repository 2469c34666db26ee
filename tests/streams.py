"""Synthetic documents and a row-logging generator for the data tests: importable by Ray's workers (a function of a
test module is not), where a streamed dataset's generator runs."""
from __future__ import annotations

import time
from pathlib import Path

import numpy as np

WORDS = "the of and to in is that for it as was with be by on not this are or from at which but have".split()


def documents(n: int, seed: int = 0) -> list[dict[str, str]]:
    """n short documents of common words, each ending in its index, in three topics."""
    rng = np.random.default_rng(seed)
    return [{"text": " ".join(rng.choice(WORDS, rng.integers(5, 60))) + f" doc{i}",
             "topic": ["news", "code", "law"][i % 3]} for i in range(n)]


def logged_rows(split: str, total: int, log: str, seconds_per_row: float = 0.0):
    """A split's rows, each appended to `log` as it is yielded: what the stream's consumer actually read. A delay
    per row makes it a stream that takes a while to read, as a remote one does."""
    for i, row in enumerate(documents(total, seed=len(split))):
        with open(Path(log), "a") as f:
            f.write(f"{split}/{i}\n")
        time.sleep(seconds_per_row)
        yield row
