"""`builtin:library_method_names`: `builtin:method_names` over the standard library and the Python libraries moelab
itself depends on (torch, transformers, ray, mlflow, deepspeed, datasets, peft, evaluate), which every moelab install
has, at the versions pyproject.toml pins.

The standard library alone holds about 4,500 training pairs: a small model memorizes them (10 epochs at 1,500 x 32)
instead of learning to name from prose, and a wider model then gains nothing. These libraries hold several times as
many documented functions, written in the same docstring style. Each name gives at most `MAX_PER_NAME` pairs, so
the thousands of `forward` and `from_dict` methods do not teach one answer for everything.
"""
from __future__ import annotations

import hashlib
import importlib.util
from pathlib import Path

from moe_data.method_names import documented_pairs
from moe_data.pairs import PairCorpus
from moe_data.stdlib_pairs import budgeted_pairs, module_name, stdlib_named_modules

LIBRARIES = ("torch", "transformers", "ray", "mlflow", "deepspeed", "datasets", "peft", "evaluate")
MAX_PER_NAME = 4


def _library_modules(package: str) -> list[tuple[str, Path]]:
    spec = importlib.util.find_spec(package)  # finds the package without importing it
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(f"builtin:library_method_names reads the installed {package!r}, not found")
    package_dir = Path(next(iter(spec.submodule_search_locations)))
    root = package_dir.parent
    return [(module_name(path, root), path) for path in package_dir.rglob("*.py")
            if not any("test" in part for part in path.relative_to(root).parts)]


def named_modules() -> list[tuple[str, Path]]:
    """The standard library's and every library's modules in hash order, so a budget samples all of them."""
    modules = stdlib_named_modules() + [m for package in LIBRARIES for m in _library_modules(package)]
    return sorted(modules, key=lambda m: hashlib.sha1(m[0].encode()).hexdigest())


def load_library_method_names(max_chars: int) -> PairCorpus:
    """Pairs until each split holds its share (90/5/5) of `max_chars` document characters; split by pair id."""
    return budgeted_pairs(documented_pairs, max_chars, f"builtin:library_method_names(max_chars={max_chars})",
                          key=lambda pair: pair.document, modules=named_modules(), max_per_summary=MAX_PER_NAME)
