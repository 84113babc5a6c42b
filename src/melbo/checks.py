"""Type and range checks shared by the library's entry points: wrong types fail as one line, before any work.

The API takes plain Python values, so `n_vectors=2.5` or `scale=float("nan")` arrive unchecked by any parser.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

from melbo.errors import MelboError


def option(name: str) -> str:
    """A setting's name as the command line spells it (n_vectors → n-vectors)."""
    return name.replace("_", "-")


def is_whole(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_real(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def check_finite(name: str, value: Any) -> float:
    """`value` as a float, refusing non-numbers, NaN and ±inf (they steer or sample into NaN logits)."""
    if not is_real(value) or not math.isfinite(value):
        raise MelboError(f"{option(name)} must be a finite number, got {value!r}")
    return float(value)


MAX_SCALE = 100.0  # scale 1 is the trained radius; 100× it already drowns the model's own activations


def check_scale(value: Any) -> float:
    """A steering scale: finite, and within ±MAX_SCALE (far beyond it a model writes nothing, or noise, or NaN)."""
    scale = check_finite("scale", value)
    if abs(scale) > MAX_SCALE:
        raise MelboError(f"scale {value!r} is too large: give one between -{MAX_SCALE:g} and {MAX_SCALE:g} "
                         "(1 is the trained radius; far beyond it the model writes nothing or noise)")
    return scale


def check_share(name: str, value: Any) -> float:
    """A share or a significance level: a finite number in (0, 1]."""
    share = check_finite(name, value)
    if not 0 < share <= 1:
        raise MelboError(f"{option(name)} must be above 0 and at most 1, got {value!r}")
    return share


def is_utf8(text: str) -> bool:
    """Whether `text` is real text: bytes that were not UTF-8 reach Python (argv, os.fsdecode) as lone surrogates,
    which every tokenizer, JSON writer and SQLite refuses with a traceback of its own."""
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_whole(name: str, value: Any) -> int:
    if not is_whole(value):
        raise MelboError(f"{option(name)} must be a whole number, got {value!r}")
    return value


# Steps, vectors, iterations, tokens: far past any real job. Above 2**63 a tensor shape is a TypeError deep in torch,
# and well below it an allocation the machine cannot make; either way a traceback instead of a line.
MAX_COUNT = 1_000_000


def check_count_bound(name: str, value: int) -> None:
    """Refuse a count (already a whole number) above MAX_COUNT."""
    if value > MAX_COUNT:
        raise MelboError(f"{option(name)} {value} is too large: give at most {MAX_COUNT:,}")


# The annotation of a settings field (as a string, under `from __future__ import annotations`) → its check.
_CHECKS = {
    "int": lambda name, v: check_whole(name, v),
    "Optional[int]": lambda name, v: v is None or check_whole(name, v),
    "float": lambda name, v: check_finite(name, v),
    "Optional[float]": lambda name, v: v is None or check_finite(name, v),
    "str": lambda name, v: _check_type(name, v, str, "text"),
    "Optional[str]": lambda name, v: v is None or _check_type(name, v, str, "text"),
    "bool": lambda name, v: _check_type(name, v, bool, "true or false"),
    "Optional[bool]": lambda name, v: v is None or _check_type(name, v, bool, "true, false or None"),
}


def _check_type(name: str, value: Any, kind: type, words: str) -> None:
    if not isinstance(value, kind):
        raise MelboError(f"{option(name)} must be {words}, got {value!r}")


def check_fields(record: Any) -> None:
    """Check every field of a settings dataclass against its annotation (int, float, str, bool, Optional[...]).

    Fields of other annotations are checked elsewhere: prompts where they are used, positions as the settings are
    built (melbo.positions).
    """
    for f in dataclasses.fields(record):
        check = _CHECKS.get(str(f.type).replace(" ", ""))
        if check is not None:
            check(f.name, getattr(record, f.name))
