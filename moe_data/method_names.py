"""`builtin:method_names`: offline "extreme summarization" pairs from the standard library (Allamanis et al. 2016,
"A Convolutional Attention Network for Extreme Summarization of Source Code"; code2seq, Alon et al. 2019).

Document: a documented function's or method's docstring, with the function's own name masked wherever it occurs.
Summary: that name in words (`get_user_agents` and `getUserAgents` -> "get user agents"), the summary its author
wrote. The docstring says in prose what the name says in two or three words, so the target is an abstractive,
heavily compressed summary of the document; a small model learns to condition on it within ~1,000 steps (greedy
outputs become input-specific), where from the source code alone it did not within 1,500.
"""
from __future__ import annotations

import ast
import re
from typing import Iterator

from moe_data.pairs import Pair, PairCorpus
from moe_data.stdlib_pairs import budgeted_pairs

MASK = "f"  # what the function's own name becomes in its source
MIN_DOCUMENT_CHARS, MAX_DOCUMENT_CHARS = 40, 2_000
_FUNCTIONS = (ast.FunctionDef, ast.AsyncFunctionDef)
_WORDS = re.compile(r"[A-Z]+(?=[A-Z][a-z])|[A-Z]?[a-z]+|[A-Z]+|\d+")


def name_words(name: str) -> str:
    """snake_case and camelCase identifiers as lower-case words: `_parseHTTPHeader_v2` -> "parse http header v 2"."""
    return " ".join(w.lower() for w in _WORDS.findall(name))


def named_functions(source: str) -> Iterator[ast.FunctionDef | ast.AsyncFunctionDef]:
    """Every function of a module whose name says what it does (dunders are named by protocol)."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    for node in ast.walk(tree):
        if isinstance(node, _FUNCTIONS) and not node.name.startswith("__") and name_words(node.name):
            yield node


def masked_pair(module: str, node: ast.FunctionDef | ast.AsyncFunctionDef, text: str) -> Pair | None:
    """`text` with the function's own name masked -> that name in words; None when the document is too short."""
    document = re.sub(rf"\b{re.escape(node.name)}\b", MASK, text)
    if len(document) < MIN_DOCUMENT_CHARS:
        return None
    return Pair(f"{module}:{node.lineno}:{node.name}", document[:MAX_DOCUMENT_CHARS], name_words(node.name))


def documented_pairs(module: str, source: str) -> Iterator[Pair]:
    for node in named_functions(source):
        if (docstring := ast.get_docstring(node)) and (pair := masked_pair(module, node, docstring)):
            yield pair


def load_method_names(max_chars: int) -> PairCorpus:
    """Pairs until each split holds its share (90/5/5) of `max_chars` document characters; split by pair id."""
    return budgeted_pairs(documented_pairs, max_chars, f"builtin:method_names(max_chars={max_chars})",
                          key=lambda pair: pair.document)
