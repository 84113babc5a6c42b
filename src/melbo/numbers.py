"""Numbers that may be missing or not a number: one test of finiteness, NaN → None for JSON, '—' for people."""

from __future__ import annotations

import json
import math
from typing import Any, Optional


def finite(x: Any) -> bool:
    """A real, finite number (bools are not numbers here)."""
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def finite_or_none(x: Any) -> Optional[float]:
    """x as a float, or None when it is missing or not finite (strict JSON has no NaN)."""
    if hasattr(x, "item"):  # numpy / torch scalars
        x = x.item()
    return float(x) if finite(x) else None


def jsonable(obj: Any) -> Any:
    """obj with every float that is not finite replaced by None, recursively, so that it is strict JSON."""
    if isinstance(obj, float):
        return finite_or_none(obj)
    if isinstance(obj, dict):
        return {k: jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a human: 3 significant digits, '—' for missing or not-a-number."""
    if not finite(x):
        return "—"
    return f"{x:.{digits}g}"


def format_cell(value: Any) -> str:
    """A table cell for a human: numbers as `fmt` does, booleans yes/no, None '—', lists and dicts as JSON."""
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)
