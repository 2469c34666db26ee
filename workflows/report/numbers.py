"""How a number is written where a person reads it: tables, run names, terminal lines."""
from __future__ import annotations

from typing import Any


def significant(value: float, digits: int = 3) -> str:
    """`value` to `digits` significant digits: 0.0066055247980503174 -> 0.00661, 0.000132715 -> 1.33e-4."""
    if value == 0 or 1e-3 <= abs(value) < 1e5:
        return f"{value:.{digits}g}"
    mantissa, exponent = f"{value:.{digits - 1}e}".split("e")
    if "." in mantissa:
        mantissa = mantissa.rstrip("0").rstrip(".")
    return f"{mantissa}e{int(exponent)}"


def parse_number(text: Any) -> Any:
    """A value read back from MLflow (params are strings) as the number it was, when it was one."""
    if not isinstance(text, str):
        return text
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def readable(value: Any, digits: int = 3) -> str:
    """A table cell or name part: floats to `digits` significant digits, None as a dash, the rest as written."""
    if value is None:
        return "—"
    if isinstance(value, float):
        return significant(value, digits)
    return str(value)
