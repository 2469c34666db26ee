"""The base of every options schema a study file feeds (study sections, router and model options).

Unknown keys are errors, values are frozen, and two things pydantic's lax mode lets through are refused: a
non-finite float (`lr: .inf`) and a boolean where a number is expected (`steps: true` would train for 1 step).
"""
from __future__ import annotations

from types import UnionType
from typing import Annotated, Any, Literal, Union, get_args, get_origin

from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationInfo, field_validator


def _refuses_bool(annotation: Any) -> bool:
    """True for numbers, text and containers of them; False where a boolean may be meant (bool, Any, a nested
    model, which checks its own fields)."""
    if annotation in (int, float, str, type(None)):
        return True
    origin, args = get_origin(annotation), get_args(annotation)
    if origin is Annotated:
        return _refuses_bool(args[0])
    if origin is Literal:
        return not any(isinstance(v, bool) for v in args)
    if origin in (Union, UnionType, list, tuple, dict, set):
        return all(_refuses_bool(a) for a in args if a is not Ellipsis)
    return False


def _holds_bool(value: Any, budget: int = 10_000) -> bool:
    """Whether a boolean sits anywhere in `value`; looks at `budget` items at most (a YAML alias bomb is a huge
    tree from a small file; past the budget the field's own validation has the last word)."""
    pending = [value]
    while pending and budget > 0:
        item = pending.pop()
        budget -= 1
        if isinstance(item, bool):
            return True
        if isinstance(item, dict):
            pending.extend(item.values())
        elif isinstance(item, (list, tuple)):
            pending.extend(item)
    return False


# Whether a field is part of a cell's identity, declared as field metadata (workflows/study/identity.py reads it).
@dataclass(frozen=True)
class CellKey:
    """Part of the cell's identity."""


@dataclass(frozen=True)
class NotCellKey:
    """Not part of the identity: changing it changes how a cell runs or is shown, not what it trains."""

    why: str


@dataclass(frozen=True)
class CellKeyUnlessDefault:
    """Part of the identity only when set away from its default: a field added after cells existed, whose default
    is what those cells did, keeps their ids."""

    why: str


@dataclass(frozen=True)
class CellKeyWhen:
    """Part of the identity only when another field of the section has a value (a setting that exists only then)."""

    field: str
    value: Any


CELL_KEY = CellKey()
Decision = CellKey | NotCellKey | CellKeyUnlessDefault | CellKeyWhen
# A router or model option added after cells existed: its default is what those cells did, so they keep their ids.
ADDED_LATER = CellKeyUnlessDefault("added after cells existed; the default is what they did")


# A name that becomes a folder or an MLflow experiment: no '..', no leading dot or dash, no separators.
NAME_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,99}$"


class StrictOptions(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)

    @field_validator("*", mode="before")
    @classmethod
    def _no_bool_for_numbers(cls, value: Any, info: ValidationInfo) -> Any:
        field = cls.model_fields.get(info.field_name) if info.field_name else None
        if field is not None and _holds_bool(value) and _refuses_bool(field.annotation):
            raise ValueError(f"a boolean ({value!r}) is not a valid value here; write the number or text itself")
        return value
