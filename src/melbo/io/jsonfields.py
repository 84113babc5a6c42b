"""Typed reading of the JSON files melbo writes: every field checked once, where the file is read.

A file on disk may be hand-edited, truncated by another tool or written by another version. `Fields` wraps one
JSON object of a file and reads each field as the type the code needs (a whole number in range, a finite float,
text from a set of choices, ...), so that a bad value is one line naming the file, the field and the fix, not a
`KeyError` deep in a report, a database error in the catalogue or NaN in a tensor. No torch import.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Optional, Sequence

from melbo.errors import MelboError

SQLITE_MAX = 2**63 - 1  # SQLite's INTEGER: a larger Python int fails the insert as OverflowError
_REQUIRED = object()


class Fields:
    """One JSON object of `file`, read field by field. `where` names the object inside the file ("model")."""

    def __init__(self, raw: Any, file: Path | str, fix: str, where: str = ""):
        self.file, self.fix, self.where = Path(file), fix, where
        if not isinstance(raw, dict):
            raise self.error(where or "the file", f"is {type(raw).__name__}, not an object")
        self.raw = raw

    def error(self, key: str, problem: str) -> MelboError:
        return MelboError(f"{self.file} is malformed ({key} {problem}): {self.fix}")

    def _name(self, key: str) -> str:
        return f"{self.where}.{key}" if self.where else key

    def _get(self, key: str, default: Any) -> Any:
        if key in self.raw:
            return self.raw[key]
        if default is _REQUIRED:
            raise self.error(self._name(key), "is missing")
        return default

    def text(self, key: str, default: Any = _REQUIRED, choices: Optional[Sequence[str]] = None) -> Optional[str]:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, str):
            raise self.error(self._name(key), f"is {value!r}, not text")
        if choices is not None and value not in choices:
            raise self.error(self._name(key), f"is {value!r}, not one of {', '.join(choices)}")
        return value

    def whole(self, key: str, low: int = -SQLITE_MAX, high: int = SQLITE_MAX,
              default: Any = _REQUIRED) -> Optional[int]:
        """An integer in [low, high] (bools are not numbers here)."""
        value = self._get(key, default)
        if value is None and default is None:
            return None
        return self.check_whole(self._name(key), value, low, high)

    def check_whole(self, name: str, value: Any, low: int = -SQLITE_MAX, high: int = SQLITE_MAX) -> int:
        if not isinstance(value, int) or isinstance(value, bool):
            raise self.error(name, f"is {value!r}, not a whole number")
        if not low <= value <= high:
            raise self.error(name, f"is {value}, outside {low}..{high}")
        return value

    def real(self, key: str, low: float = -math.inf, high: float = math.inf, *, above: Optional[float] = None,
             default: Any = _REQUIRED) -> Optional[float]:
        """A finite float in [low, high] (and > `above` when given); an int is taken as a float."""
        value = self._get(key, default)
        if value is None and default is None:
            return None
        return self.check_real(self._name(key), value, low, high, above=above)

    def check_real(self, name: str, value: Any, low: float = -math.inf, high: float = math.inf, *,
                   above: Optional[float] = None) -> float:
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise self.error(name, f"is {value!r}, not a number")
        try:
            number = float(value)
        except OverflowError:  # an integer beyond float's range
            raise self.error(name, f"is {value}, too large") from None
        if not math.isfinite(number):
            raise self.error(name, f"is {value}, not a finite number")
        if not low <= number <= high or (above is not None and not number > above):
            bound = f"> {above:g}" if above is not None else f"in [{low:g}, {high:g}]"
            raise self.error(name, f"is {value}, not {bound}")
        return number

    def flag(self, key: str, default: Any = _REQUIRED) -> Optional[bool]:
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, bool):
            raise self.error(self._name(key), f"is {value!r}, not true or false")
        return value

    def object(self, key: str, default: Any = _REQUIRED) -> Optional["Fields"]:
        """A nested object, as Fields of the same file (None when absent and `default` is None)."""
        value = self._get(key, default)
        if value is None and default is None:
            return None
        return Fields(value, self.file, self.fix, self._name(key))

    def mapping(self, key: str, default: Any = _REQUIRED) -> Optional[dict]:
        """A nested object kept as a plain dict (free-form: versions, provenance, a method's own record)."""
        value = self._get(key, default)
        if value is None and default is None:
            return None
        if not isinstance(value, dict):
            raise self.error(self._name(key), f"is {type(value).__name__}, not an object")
        return value

    def items(self, key: str, default: Any = _REQUIRED) -> list:
        """A list (empty when absent and `default` is [] or None)."""
        value = self._get(key, default)
        if value is None:
            return []
        if not isinstance(value, list):
            raise self.error(self._name(key), f"is {type(value).__name__}, not a list")
        return value

    def objects(self, key: str, default: Any = _REQUIRED) -> list["Fields"]:
        """A list of objects, each as Fields named key[i]."""
        return [Fields(item, self.file, self.fix, f"{self._name(key)}[{i}]")
                for i, item in enumerate(self.items(key, default))]

    def texts(self, key: str, default: Any = _REQUIRED) -> list[str]:
        values = self.items(key, default)
        for i, value in enumerate(values):
            if not isinstance(value, str):
                raise self.error(f"{self._name(key)}[{i}]", f"is {value!r}, not text")
        return values

    def reals(self, key: str, default: Any = _REQUIRED, *, missing: bool = False) -> list[Optional[float]]:
        """A list of finite numbers (`missing`: null entries allowed, as strict JSON writes NaN)."""
        values = self.items(key, default)
        return [None if v is None and missing else self.check_real(f"{self._name(key)}[{i}]", v)
                for i, v in enumerate(values)]

    def rest(self, known: Sequence[str]) -> dict:
        """The fields not in `known`, kept as they are (a newer version's or a plugin's, round-tripped)."""
        return {k: v for k, v in self.raw.items() if k not in known}


def read_lines(file: Path, fix: str) -> list[Fields]:
    """A JSON-lines file, one `Fields` per non-empty line (named "FILE line N"); a corrupt line is one line too."""
    from melbo.io.files import read_text

    rows = []
    for n, line in enumerate(read_text(file, file.name, fix).splitlines(), 1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except json.JSONDecodeError as exc:
            raise MelboError(f"{file} line {n} is corrupt ({exc.msg}): {fix}") from None
        rows.append(Fields(raw, f"{file} line {n}", fix))
    return rows
