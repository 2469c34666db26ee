"""Which config fields make a cell what it is, declared on the fields themselves (pydantic field metadata).

A cell's id hashes its identity, so a re-run finds its finished cells and a change to anything that alters what is
trained makes a new cell. Each field of a cell's sections says which it is:

    steps: Annotated[PositiveInt, CELL_KEY] = 100                    # part of the identity (the default)
    compile: Annotated[bool, NotCellKey("how it runs, not what")] = False
    batching: Annotated[..., CellKeyUnlessDefault("added later")] = "random"
    fp16_initial_scale_power: Annotated[int, CellKeyWhen("precision", "fp16")] = 16

A field with no declaration counts as part of the identity (a new field re-keys cells rather than silently merging
different trainings); tests/workflows/test_cell_identity.py fails until every field of a section has a declaration.
"""
from __future__ import annotations

from typing import Any

from pydantic import BaseModel

# The vocabulary lives with the options base, so that router options declare their fields too.
from moe_models.options import CELL_KEY, CellKey, CellKeyUnlessDefault, CellKeyWhen, Decision, NotCellKey  # noqa: F401


def decision(model: type[BaseModel], name: str) -> Decision | None:
    """The field's declaration, or None when it has none."""
    return next((m for m in model.model_fields[name].metadata if isinstance(m, Decision)), None)


def in_identity(section: BaseModel, name: str) -> bool:
    rule = decision(type(section), name) or CELL_KEY
    if isinstance(rule, NotCellKey):
        return False
    if isinstance(rule, CellKeyUnlessDefault):
        return getattr(section, name) != type(section).model_fields[name].get_default(call_default_factory=True)
    if isinstance(rule, CellKeyWhen):
        return getattr(section, rule.field) == rule.value
    return True


def left_out(section: BaseModel) -> set[str]:
    """The section's fields that its declarations leave out of the identity, as it is set."""
    return {name for name in type(section).model_fields if not in_identity(section, name)}


def identity(section: BaseModel, resolved: dict[str, Any]) -> dict[str, Any]:
    """`resolved` (the section's JSON record) less the fields its declarations leave out of the identity. Keys that
    are not fields (a component's options, written inline) stay: they are what it trains."""
    out = left_out(section)
    return {key: value for key, value in resolved.items() if key not in out}
