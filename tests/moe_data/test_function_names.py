"""`builtin:function_names`: every stdlib function (documented or not) with its name masked -> that name in words."""
import ast
import re
import sysconfig
from pathlib import Path

import pytest

from moe_data.corpus import SPLITS
from moe_data.function_names import load_function_names
from moe_data.method_names import load_method_names
from moe_data.sources import task_of

BUDGET = 300_000


@pytest.fixture(scope="module")
def corpus():
    return load_function_names(BUDGET)


def _node(pair_id: str) -> ast.FunctionDef | ast.AsyncFunctionDef:
    module, line, _name = pair_id.rsplit(":", 2)
    # The file itself, not an import: setuptools' shim answers for `distutils`.
    path = Path(sysconfig.get_paths()["stdlib"], *module.split(".")).with_suffix(".py")
    source = path.read_text(encoding="utf-8")
    return next(n for n in ast.walk(ast.parse(source))
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and n.lineno == int(line))


def test_the_name_is_masked_and_documented_functions_read_docstring_first(corpus):
    pairs = corpus.splits["validation"][:40]
    documented = 0
    for pair in pairs:
        node = _node(pair.pair_id)
        assert not re.search(rf"\b{re.escape(node.name)}\b", pair.document)  # nothing to copy the answer from
        docstring = ast.get_docstring(node)
        if docstring:
            documented += 1
            assert pair.document.startswith(re.sub(rf"\b{re.escape(node.name)}\b", "f", docstring)[:200])
            assert docstring not in pair.document[len(docstring):]  # the docstring is not repeated in the code
        assert "def f(" in pair.document or len(pair.document) == 2_000  # the code follows (unless truncated)
    assert 0 < documented < len(pairs)  # both kinds are present


def test_it_holds_every_method_names_pair_and_more(corpus):
    """The undocumented functions are what it adds: more pairs for the same stdlib."""
    everything = {p.pair_id for s in SPLITS for p in load_function_names(100_000_000).splits[s]}
    documented = {p.pair_id for s in SPLITS for p in load_method_names(100_000_000).splits[s]}
    assert len(everything) > 2 * len(documented)
    assert len(documented - everything) < 0.01 * len(documented)  # a documented function keeps its pair


def test_splits_are_disjoint_deterministic_and_a_summarization_task(corpus):
    ids = [{p.pair_id for p in corpus.splits[s]} for s in SPLITS]
    assert all(ids) and not (ids[0] & ids[1] or ids[0] & ids[2] or ids[1] & ids[2])
    assert load_function_names(BUDGET).fingerprint == corpus.fingerprint
    assert task_of("builtin:function_names", None) == "summarization"
