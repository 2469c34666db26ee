"""Property: whatever a study file holds, `moelab validate` either accepts it or exits 2 with a short message that
names a field or the file. Never a traceback, never a hang, never megabytes of output.

Every shipped study file is mutated structurally (types swapped, keys deleted or added, extreme numbers, NaN/inf,
booleans, deep nesting) and textually (stray bytes, other encodings, truncation, duplicated lines, YAML aliases).
A few hundred cases run in CI; `-m slow` runs the same properties with many more.
"""
from __future__ import annotations

import contextlib
import io
import math
import re
import tempfile
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import workflows.study.schema  # noqa: F401  (imports DeepSpeed, whose import-time log line is not a validation message)
from workflows.driver.cli import main

STUDIES = sorted((Path(__file__).resolve().parents[2] / "studies").glob("*.yaml"))
TEXTS = {p.name: p.read_text() for p in STUDIES}
TREES = {name: yaml.safe_load(text) for name, text in TEXTS.items()}
MAX_MESSAGE = 20_000
# Problems about the file as a whole; every other line of a message starts with the field it is about.
FILE_LEVEL = re.compile(r"^  (not UTF-8 text|not valid YAML|\.\.\. and \d+ more)")
_KEY = r"([A-Za-z_][\w\-]*|'.*?'|\".*?\")"  # a key, or an odd one quoted
FIELD_LINE = re.compile(rf"^  {_KEY}(\[-?\d+\]|\.{_KEY})*: \S")  # routers[0].balancing.switch_lbl: ...

EXTREME_NUMBERS = st.sampled_from([0, -1, 1, 2**31, 2**63, -(2**63), 10**400, 1e-300, 1e300, -0.0, math.inf,
                                   -math.inf, math.nan, 0.5, 1e-4])
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(), st.floats(allow_nan=True, allow_infinity=True),
                    EXTREME_NUMBERS, st.text(max_size=20), st.sampled_from(["", "..", "/", "~nosuchuser/x", "a" * 300,
                                                                             "file:/" + "b" * 300 + ".jsonl",
                                                                             "{document} {x}", "{", "builtin:x"]))
VALUES = st.recursive(SCALARS, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                        st.dictionaries(st.text(max_size=8), inner, max_size=3)),
                      max_leaves=6)


def validate_outcome(data: bytes) -> tuple[int, str]:
    """(exit code, stderr) of `moelab validate` on a file holding `data`, in this process."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "study.yaml"
        path.write_bytes(data)
        err, out = io.StringIO(), io.StringIO()
        with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
            try:
                code = main(["validate", str(path)])
            except SystemExit as exit_info:
                code = exit_info.code
        return code, err.getvalue()


def check(data: bytes) -> str:
    """The property; returns the outcome ('valid' or 'invalid') so a run can count them."""
    code, err = validate_outcome(data)
    assert code in (0, 2), err[-2000:]
    assert "Traceback" not in err and len(err) < MAX_MESSAGE, err[:2000]
    if code == 0:
        return "valid"
    header, *problems = err.splitlines()
    assert header.endswith(": invalid study") and "study.yaml" in header, header
    assert problems, err
    for line in problems:
        assert FIELD_LINE.match(line) or FILE_LEVEL.match(line), line
    return "invalid"


def paths(tree: Any, prefix: tuple = ()) -> list[tuple]:
    """Every key path into a parsed study (dict keys and list indices)."""
    found = [prefix]
    if isinstance(tree, dict):
        for key, value in tree.items():
            found += paths(value, prefix + (key,))
    elif isinstance(tree, list):
        for i, value in enumerate(tree):
            found += paths(value, prefix + (i,))
    return found


def apply(tree: Any, path: tuple, action: str, value: Any) -> Any:
    if not path:
        return value if action == "replace" else tree
    head, rest = path[0], path[1:]
    if isinstance(tree, dict):
        tree = dict(tree)
        if not rest and action == "delete":
            tree.pop(head, None)
        elif not rest and action == "add":
            tree[f"unknown_{head}"] = value
        else:
            tree[head] = apply(tree[head], rest, action, value)
    elif isinstance(tree, list):
        tree = list(tree)
        if not rest and action == "delete":
            tree.pop(head)
        elif not rest and action == "add":
            tree.append(tree[head])  # a repeated entry
        else:
            tree[head] = apply(tree[head], rest, action, value)
    return tree


@st.composite
def structural(draw) -> bytes:
    name = draw(st.sampled_from(sorted(TREES)))
    tree = TREES[name]
    for _ in range(draw(st.integers(1, 3))):
        path = draw(st.sampled_from(paths(tree)))
        tree = apply(tree, path, draw(st.sampled_from(["replace", "delete", "add"])), draw(VALUES))
    if draw(st.booleans()):  # deep nesting somewhere
        depth = draw(st.integers(50, 250))  # deeper nesting: the textual strategy (yaml.safe_dump recurses)
        tree = apply(tree, draw(st.sampled_from(paths(tree))), "replace", _nested(depth))
    return yaml.safe_dump(tree, allow_unicode=True).encode()


def _nested(depth: int) -> Any:
    value: Any = 0
    for _ in range(depth):
        value = [value]
    return value


ALIAS_BOMB = "&a0 [x, x, x, x, x, x, x, x, x]"
for _level in range(1, 6):
    ALIAS_BOMB = f"&a{_level} [{ALIAS_BOMB}, {', '.join([f'*a{_level - 1}'] * 8)}]"


@st.composite
def textual(draw) -> bytes:
    text = TEXTS[draw(st.sampled_from(sorted(TEXTS)))]
    kind = draw(st.sampled_from(["bytes", "encoding", "truncate", "duplicate_line", "alias", "nesting", "splice"]))
    if kind == "bytes":
        data = text.encode()
        at = draw(st.integers(0, len(data)))
        return data[:at] + draw(st.binary(min_size=1, max_size=8)) + data[at:]
    if kind == "encoding":
        return (text + "\n# café ☃\n").encode(draw(st.sampled_from(["latin-1", "utf-16", "utf-32", "cp1252"])),
                                                errors="replace")
    if kind == "truncate":
        return text.encode()[:draw(st.integers(0, len(text)))]
    lines = text.splitlines(keepends=True)
    if kind == "duplicate_line":
        i = draw(st.integers(0, len(lines) - 1))
        return "".join(lines[:i + 1] + [lines[i]] + lines[i + 1:]).encode()
    if kind == "alias":  # a small file that expands to a huge tree, put where a value goes
        key = draw(st.sampled_from(["seeds", "description", "routers", "sweep"]))
        value = {"sweep": f"{{name: s, space: {{k: {{choice: [{ALIAS_BOMB}, *a5]}}}}}}"}.get(key, f"[{ALIAS_BOMB}]")
        kept = [line for line in lines if not line.startswith(f"{key}:")]
        return ("".join(kept) + f"\n{key}: {value}\n").encode()
    if kind == "nesting":
        depth = draw(st.integers(10, 3000))
        return (text + f"\ndescription: {'[' * depth}{']' * depth}\n").encode()
    i, j = sorted(draw(st.lists(st.integers(0, len(text)), min_size=2, max_size=2)))
    return (text[:i] + draw(st.text(max_size=12)) + text[j:]).encode()


FAST = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
THOROUGH = settings(max_examples=1000, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def test_every_shipped_study_validates():
    for name, text in TEXTS.items():
        assert check(text.encode()) == "valid", name


@FAST
@given(structural())
def test_structurally_mutated_studies_validate_or_fail_with_a_field(data):
    check(data)


@FAST
@given(textual())
def test_textually_damaged_studies_validate_or_fail_with_a_field(data):
    check(data)


@pytest.mark.slow
@THOROUGH
@given(st.one_of(structural(), textual()))
def test_many_more_mutated_studies(data):
    check(data)
