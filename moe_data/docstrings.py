"""`builtin:docstrings`: offline summarization pairs from the standard library, with human-written summaries.

Document: a function's or class's source code, its docstring body (everything after the summary line) first.
Summary: the docstring's one-line summary, as its author wrote it. The summary itself is removed from the document,
so a model cannot copy it; test modules are left out (their docstrings are rarely summaries).
"""
from __future__ import annotations

import ast
from typing import Iterator

from moe_data.pairs import Pair, PairCorpus
from moe_data.stdlib_pairs import budgeted_pairs

MIN_SUMMARY_WORDS, MAX_SUMMARY_WORDS = 4, 40
MIN_DOCUMENT_CHARS, MAX_DOCUMENT_CHARS = 200, 4_000
_NODES = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)


def _code_without_docstring(lines: list[str], node: ast.AST) -> str:
    doc = node.body[0]  # ast.get_docstring found one, so it is the first statement
    kept = lines[node.lineno - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno]
    return "\n".join(kept)


def _pairs_of(module: str, source: str) -> Iterator[Pair]:
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):
        return
    lines = source.splitlines()
    for node in ast.walk(tree):
        if not isinstance(node, _NODES) or not (doc := ast.get_docstring(node, clean=True)):
            continue
        head, _, body = doc.partition("\n\n")
        summary = " ".join(head.split())
        if not MIN_SUMMARY_WORDS <= len(summary.split()) <= MAX_SUMMARY_WORDS:
            continue
        document = (body.strip() + "\n\n" if body.strip() else "") + _code_without_docstring(lines, node)
        if len(document) >= MIN_DOCUMENT_CHARS:
            yield Pair(f"{module}:{node.lineno}:{node.name}", document[:MAX_DOCUMENT_CHARS], summary)


def load_docstrings(max_chars: int) -> PairCorpus:
    """Pairs until each split holds its share (90/5/5) of `max_chars` document characters; split by pair id."""
    return budgeted_pairs(_pairs_of, max_chars, f"builtin:docstrings(max_chars={max_chars})",
                          key=lambda pair: pair.summary + "\0" + pair.document)
