"""Reading a study file: bytes -> UTF-8 text -> YAML (no duplicate keys) -> the validated Study, every failure a
StudyError whose lines name the field (or the file)."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from workflows.study.errors import StudyError, problems_of, short
from workflows.study.schema import Study


def parse_study(data: Any, source: str = "study") -> Study:
    if not isinstance(data, dict):
        raise StudyError(source, ["study: expected a mapping at the top level"])
    try:
        return Study.model_validate(data)
    except ValidationError as err:
        raise StudyError(source, problems_of(err)) from None


# libyaml's parser where PyYAML was built with it (a 400,000-cell study's seed list parses ~10x faster); the same
# safe constructor either way.
_SafeLoader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)


class _UniqueKeyLoader(_SafeLoader):
    """YAML's safe loader, except that a key written twice in one mapping is an error (not: the last one wins)."""

    def construct_mapping(self, node, deep=False):
        seen: dict = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                earlier = seen.setdefault(key, key_node)
            except TypeError:  # an unhashable key: the base loader reports it
                continue
            if earlier is not key_node:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {short(key)} appears twice in one mapping (line {earlier.start_mark.line + 1} "
                    f"and line {key_node.start_mark.line + 1}); keep one", key_node.start_mark)
        return super().construct_mapping(node, deep)


def _yaml_problem(err: yaml.YAMLError) -> str:
    """One line: what is wrong and where (YAML's own message spans several, with an excerpt of the file)."""
    mark = getattr(err, "problem_mark", None)
    where = f"line {mark.line + 1}, column {mark.column + 1}: " if mark is not None else ""
    what = " ".join(str(part) for part in (getattr(err, "context", None), getattr(err, "problem", None)) if part)
    return (where + (what or str(err))).replace("\n", " ")


MAX_NESTING = 64


def _nesting(text: str) -> int:
    """How deep the file's collections nest, from YAML's event stream (the parser iterates; composing recurses, and
    how deep it may recurse depends on the interpreter's limit at the time)."""
    depth = deepest = 0
    for event in yaml.parse(text, Loader=_SafeLoader):
        if isinstance(event, yaml.CollectionStartEvent):
            depth += 1
            deepest = max(deepest, depth)
        elif isinstance(event, yaml.CollectionEndEvent):
            depth -= 1
    return deepest


def load_study(path: str | Path) -> Study:
    source = str(path)
    try:
        raw = Path(path).read_bytes()
    except FileNotFoundError:
        raise StudyError(source, [f"study file not found: {short(source)[1:-1]}"]) from None
    except (OSError, RuntimeError) as err:  # a folder, no permission, a name the OS refuses
        raise StudyError(source, [f"cannot read the study file: {err.strerror or err}"]) from None
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        line = raw.count(b"\n", 0, err.start) + 1
        raise StudyError(source, [f"not UTF-8 text: byte 0x{raw[err.start]:02x} at offset {err.start} (line {line}); "
                                  "save the file as UTF-8"]) from None
    try:
        if (depth := _nesting(text)) > MAX_NESTING:
            raise StudyError(source, [f"study: nested {depth} levels deep; a study file needs a few (at most "
                                      f"{MAX_NESTING})"])
        data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 (a SafeLoader)
        return parse_study(data, source)
    except yaml.YAMLError as err:
        raise StudyError(source, [f"not valid YAML: {_yaml_problem(err)}"]) from None
    except RecursionError:
        raise StudyError(source, ["study: nested too deeply to be a study file"]) from None


def with_seeds(study: Study, seeds: str) -> Study:
    """The study on other seeds ("3,4,5"): everything else, and so every cell's identity but its seed, unchanged."""
    try:
        values = [int(x) for x in seeds.split(",") if x.strip()]
    except ValueError:
        raise StudyError("--seeds", [f"--seeds: {short(seeds)} is not a comma-separated list of integers"]) from None
    problems = [f"--seeds: {v} is negative" for v in values if v < 0]
    problems += [f"--seeds: {v} is listed more than once" for v in sorted({v for v in values if values.count(v) > 1})]
    if not values:
        problems.append("--seeds: no seed given")
    if problems:
        raise StudyError("--seeds", problems)
    return study.model_copy(update={"seeds": values})  # the rest was validated with the file
