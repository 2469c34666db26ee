"""`builtin:method_names`: a function's docstring with its name masked -> that name in words."""
import ast
import importlib.util
import re

import pytest

from moe_data.corpus import SPLITS
from moe_data.method_names import MASK, load_method_names, name_words
from moe_data.sources import task_of


@pytest.mark.parametrize("name, words", [("get_user_agents", "get user agents"), ("getUserAgents", "get user agents"),
                                         ("_parseHTTPHeader_v2", "parse http header v 2"), ("close", "close"),
                                         ("__init__", "init")])
def test_identifiers_become_lower_case_words(name, words):
    assert name_words(name) == words


@pytest.fixture(scope="module")
def corpus():
    return load_method_names(300_000)


def test_the_name_is_masked_out_of_its_document(corpus):
    pairs = [p for split in SPLITS for p in corpus.splits[split]]
    assert len(pairs) > 200
    for pair in pairs:
        name = pair.pair_id.rsplit(":", 1)[1]
        assert not name.startswith("__") and name_words(name) == pair.summary
        assert not re.search(rf"\b{re.escape(name)}\b", pair.document)  # nothing to copy the answer from


def test_each_document_is_its_functions_docstring_with_the_name_masked(corpus):
    for pair in corpus.splits["validation"][:25]:
        module, line, name = pair.pair_id.rsplit(":", 2)
        source = open(importlib.util.find_spec(module).origin, encoding="utf-8").read()
        node = next(n for n in ast.walk(ast.parse(source))
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.lineno == int(line))
        assert node.name == name
        assert pair.document == re.sub(rf"\b{re.escape(name)}\b", MASK, ast.get_docstring(node))[:2_000]


def test_splits_are_disjoint_deterministic_and_a_summarization_task(corpus):
    ids = [{p.pair_id for p in corpus.splits[s]} for s in SPLITS]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert load_method_names(300_000).fingerprint == corpus.fingerprint
    assert task_of("builtin:method_names", None) == "summarization"
