"""The one error type of study input, and its bounds: a message names the field, and stays short whatever the
file holds (a YAML alias bomb cannot print megabytes)."""
from __future__ import annotations

import re
import reprlib
from typing import Any

from pydantic import ValidationError

_MAX_LINE, _MAX_PROBLEMS = 300, 40
_REPR = reprlib.Repr()  # Python 3.11's Repr takes its limits as attributes, not arguments
_REPR.maxlevel, _REPR.maxdict, _REPR.maxlist, _REPR.maxtuple, _REPR.maxset = 3, 4, 6, 6, 6
_REPR.maxstring, _REPR.maxother, _REPR.maxlong = 60, 60, 40


def short(value: Any) -> str:
    """A value as an error message shows it: bounded."""
    return _REPR.repr(value)


class StudyError(ValueError):
    """Invalid study input; `problems` are 'field.path: message' lines."""

    def __init__(self, source: str, problems: list[str], headline: str = "invalid study"):
        lines = [p if len(p) <= _MAX_LINE else p[:_MAX_LINE] + " ..." for p in problems[:_MAX_PROBLEMS]]
        if len(problems) > _MAX_PROBLEMS:
            lines.append(f"... and {len(problems) - _MAX_PROBLEMS} more")
        self.problems = lines
        super().__init__(f"{source[:_MAX_LINE]}: {headline}\n" + "\n".join(f"  {p}" for p in lines))


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if part == "options" or (isinstance(part, str) and part.startswith("function-")):
            continue
        if isinstance(part, str) and not re.fullmatch(r"[A-Za-z_][\w-]*", part):
            part = short(part)  # an odd key (from an unknown-key error): quoted, so the path stays readable
        out += f"[{part}]" if isinstance(part, int) else f".{part}" if out else str(part)
    return out or "study"


def problems_of(err: ValidationError) -> list[str]:
    """pydantic's errors as 'field.path: message' lines."""
    lines = []
    for e in err.errors():
        msg = e["msg"].removeprefix("Value error, ")
        if e["type"] == "extra_forbidden":
            msg = "unknown key (not allowed here)"
        if not e["loc"]:  # cross-field checks already name their fields, one per line
            lines.extend(msg.splitlines())
        else:
            lines.append(f"{_loc(e['loc'])}: {msg}")
    return lines
