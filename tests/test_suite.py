"""The CI subset is honest: every test left out of CI (`extended`) names CI tests that cover its behaviour, and
those exist and are not themselves left out. Read from the source (no collection, no imports)."""
import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parent
REPO = TESTS.parent


def _extended_call(node: ast.AST) -> ast.Call | None:
    """The `extended(...)` call in a decorator or in a module's `pytestmark`, if this is one."""
    if isinstance(node, ast.Call):
        func = node.func
        name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
        if name == "extended":
            return node
    return None


def _covered_by(call: ast.Call) -> list[str]:
    return [a.value for a in call.args if isinstance(a, ast.Constant) and isinstance(a.value, str)]


def _module_marks(tree: ast.Module) -> list[ast.AST]:
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "pytestmark" for t in node.targets):
            value = node.value
            return list(value.elts) if isinstance(value, (ast.List, ast.Tuple)) else [value]
    return []


def suite() -> tuple[dict[str, list[str]], set[str]]:
    """(extended test id -> the CI tests it names, every test id), ids as "tests/...py::name"."""
    extended, every = {}, set()
    for path in sorted(TESTS.rglob("test_*.py")):
        tree = ast.parse(path.read_text())
        prefix = f"{path.relative_to(REPO)}::"
        module_call = next(filter(None, map(_extended_call, _module_marks(tree))), None)
        for node in tree.body:
            if isinstance(node, ast.FunctionDef) and node.name.startswith("test_"):
                every.add(prefix + node.name)
                call = module_call or next(filter(None, map(_extended_call, node.decorator_list)), None)
                if call is not None:
                    extended[prefix + node.name] = _covered_by(call)
    return extended, every


def test_every_test_left_out_of_ci_names_ci_tests_that_cover_it():
    extended, every = suite()
    assert extended, "no extended test found: the parser no longer sees the marks"
    for test, covered_by in extended.items():
        assert covered_by, f"{test}: extended without naming the CI tests that cover it"
        for name in covered_by:
            assert name in every, f"{test}: covered_by names {name}, which is not a test"
            assert name not in extended, f"{test}: covered_by names {name}, which CI leaves out too"


def test_ci_runs_what_the_readme_says():
    script = (REPO / "scripts" / "test.sh").read_text()
    assert '-m "not extended"' in script and "--all" in script
    assert "bash scripts/test.sh" in (REPO / ".ci" / "run").read_text()
