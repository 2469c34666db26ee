"""Built-in offline corpora, derived from what every CPython installation ships.

`docstrings`: summarization pairs (moe_data/docstrings.py).
`method_names`: extreme-summarization pairs, a function's docstring -> its name in words (moe_data/method_names.py).
`function_names`: the same for every function, documented or not (moe_data/function_names.py).
`library_method_names`: `method_names` over the stdlib and moelab's own dependencies (moe_data/library_method_names.py).

`domains`: three clearly separable domains, each document labelled —
  python  the standard library's .py sources,
  c       CPython's C headers (the `include` directory),
  english pydoc's topic help texts (pydoc_data.topics), English prose.
`domains` balances the mix by a per-domain character budget, so no domain dominates the router's load (a curated
mix); `domains_natural` shares the same total in proportion to each domain's size (a natural mix).
"""
from __future__ import annotations

import hashlib
import sysconfig
from pathlib import Path
from typing import Iterable

from moe_data.corpus import SPLITS, Corpus, Document, split_of
from moe_data.docstrings import load_docstrings
from moe_data.function_names import load_function_names
from moe_data.library_method_names import load_library_method_names
from moe_data.method_names import load_method_names

MAX_DOC_CHARS = 16_000  # long files are truncated so one file cannot fill a domain's budget


def _stable_order(paths: Iterable[Path], root: Path) -> list[Path]:
    # Hash order instead of alphabetical order: a budget then samples across the whole library.
    return sorted(paths, key=lambda p: hashlib.sha1(str(p.relative_to(root)).encode()).hexdigest())


def _files(domain: str, root: Path, pattern: str) -> Iterable[Document]:
    for path in _stable_order((p for p in root.rglob(pattern) if "site-packages" not in p.parts), root):
        text = path.read_text(encoding="utf-8", errors="replace")[:MAX_DOC_CHARS]
        if text.strip():
            yield Document(f"{domain}/{path.relative_to(root)}", text, domain)


def _pydoc_topics() -> Iterable[Document]:
    from pydoc_data.topics import topics

    for name in sorted(topics):
        yield Document(f"english/{name}", topics[name], "english")


def _domain_sources() -> dict[str, Iterable[Document]]:
    paths = sysconfig.get_paths()
    include = Path(paths["include"])
    if not include.is_dir():
        raise FileNotFoundError(f"the 'c' domain needs CPython's C headers, not found at {include}")
    return {
        "python": _files("python", Path(paths["stdlib"]), "*.py"),
        "c": _files("c", include, "*.h"),
        "english": _pydoc_topics(),
    }


def load_domains(max_chars_per_domain: int) -> Corpus:
    """The curated mix: every domain the same character budget. Each split gets its share of it (90/5/5), per
    domain, so validation is balanced too."""
    budgets = dict.fromkeys(_domain_sources(), float(max_chars_per_domain))
    return _mix(budgets, f"builtin:domains(max_chars_per_domain={max_chars_per_domain})")


def load_domains_natural(max_chars_per_domain: int) -> Corpus:
    """The natural mix (the routing testbed's contrast to a curated one): the same total, 3 x max_chars_per_domain,
    shared among the domains in proportion to how much text each has in this installation (the standard library's
    sources outweigh the C headers and the help topics many times over)."""
    sizes = {domain: sum(len(d.text) for d in docs) for domain, docs in _domain_sources().items()}
    total = len(sizes) * max_chars_per_domain
    budgets = {domain: total * size / sum(sizes.values()) for domain, size in sizes.items()}
    return _mix(budgets, f"builtin:domains_natural(max_chars_per_domain={max_chars_per_domain})")


def _mix(budgets: dict[str, float], source: str) -> Corpus:
    splits: dict[str, list[Document]] = {s: [] for s in SPLITS}
    for domain, docs in _domain_sources().items():
        budget = {"train": 0.90 * budgets[domain], "validation": 0.05 * budgets[domain],
                  "test": 0.05 * budgets[domain]}
        used = dict.fromkeys(SPLITS, 0)
        for doc in docs:
            split = split_of(doc.doc_id)
            if used[split] < budget[split]:
                splits[split].append(doc)
                used[split] += len(doc.text)
            if all(used[s] >= budget[s] for s in SPLITS):
                break
    return Corpus(splits, source=source)


# name -> loader(max_chars) returning a Corpus (language modelling) or a PairCorpus (summarization)
BUILTIN = {"domains": load_domains, "domains_natural": load_domains_natural, "docstrings": load_docstrings, "method_names": load_method_names,
           "function_names": load_function_names, "library_method_names": load_library_method_names}
SUMMARIZATION_BUILTINS = {"docstrings", "method_names", "function_names", "library_method_names"}
