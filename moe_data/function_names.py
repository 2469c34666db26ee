"""`builtin:function_names`: `builtin:method_names` with every function, documented or not (about 2.6x the pairs).

Document: the function's docstring, if it has one, then its code without the docstring; the function's own name
masked wherever it occurs. Summary: that name in words. Documented functions read as in `method_names` (the
docstring comes first, so a truncated document is mostly prose); undocumented ones are named from their code alone.
"""
from __future__ import annotations

import ast
from typing import Iterator

from moe_data.method_names import masked_pair, named_functions
from moe_data.pairs import Pair, PairCorpus
from moe_data.stdlib_pairs import budgeted_pairs

def _code_of(lines: list[str], node: ast.FunctionDef | ast.AsyncFunctionDef, has_docstring: bool) -> str:
    start = node.decorator_list[0].lineno if node.decorator_list else node.lineno
    if not has_docstring:
        return "\n".join(lines[start - 1:node.end_lineno])
    doc = node.body[0]
    return "\n".join(lines[start - 1:doc.lineno - 1] + lines[doc.end_lineno:node.end_lineno])


def _pairs_of(module: str, source: str) -> Iterator[Pair]:
    lines = source.splitlines()
    for node in named_functions(source):
        docstring = ast.get_docstring(node)
        text = (docstring + "\n\n" if docstring else "") + _code_of(lines, node, docstring is not None)
        if pair := masked_pair(module, node, text):
            yield pair


def load_function_names(max_chars: int) -> PairCorpus:
    """Pairs until each split holds its share (90/5/5) of `max_chars` document characters; split by pair id."""
    return budgeted_pairs(_pairs_of, max_chars, f"builtin:function_names(max_chars={max_chars})",
                          key=lambda pair: pair.document)
