"""`builtin:library_method_names`: method_names over the stdlib and moelab's own dependencies, capped per name."""
import ast
import re
from collections import Counter

import pytest

from moe_data.corpus import SPLITS
from moe_data.library_method_names import LIBRARIES, MAX_PER_NAME, load_library_method_names, named_modules
from moe_data.method_names import name_words
from moe_data.sources import task_of

BUDGET = 2_000_000


@pytest.fixture(scope="module")
def corpus():
    return load_library_method_names(BUDGET)


@pytest.fixture(scope="module")
def module_paths():
    return dict(named_modules())


def test_each_pair_is_a_masked_docstring_named_by_its_function(corpus, module_paths):
    for pair in corpus.splits["validation"][:60]:
        module, line, name = pair.pair_id.rsplit(":", 2)
        tree = ast.parse(module_paths[module].read_text(encoding="utf-8", errors="replace"))
        node = next(n for n in ast.walk(tree)
                    if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.lineno == int(line))
        assert node.name == name and pair.summary == name_words(name)
        assert pair.document == re.sub(rf"\b{re.escape(name)}\b", "f", ast.get_docstring(node))[:2_000]


def test_it_draws_on_the_stdlib_and_the_libraries_and_caps_every_name(corpus):
    pairs = [p for s in SPLITS for p in corpus.splits[s]]
    roots = Counter(p.pair_id.split(".", 1)[0].split(":", 1)[0] for p in pairs)
    assert sum(roots[lib] for lib in LIBRARIES) > 0.5 * len(pairs)  # most pairs come from the libraries
    assert sum(v for k, v in roots.items() if k not in LIBRARIES) > 0.05 * len(pairs)  # and some from the stdlib
    assert sum(1 for lib in LIBRARIES if roots[lib]) >= 5
    names = Counter(p.summary for p in pairs)
    assert max(names.values()) == MAX_PER_NAME  # the cap binds (there are thousands of `forward`s) and holds
    assert len({p.document for p in pairs}) == len(pairs)  # verbatim copies (transformers' "Copied from") once


def test_splits_are_disjoint_deterministic_and_a_summarization_task(corpus):
    ids = [{p.pair_id for p in corpus.splits[s]} for s in SPLITS]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert load_library_method_names(BUDGET).fingerprint == corpus.fingerprint
    assert task_of("builtin:library_method_names", None) == "summarization"
