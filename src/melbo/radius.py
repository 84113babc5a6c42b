"""R, the norm of every perturbation, as a user gives it: parsed once, resolved against a residual norm once.

    Radius.parse("4.0")        absolute: R = 4.0
    Radius.parse("0.2x")       relative: R = 0.2 × the median residual norm at the source block
    Radius.parse("calibrate")  measured by the run (melbo.engine.calibrate), in a few forward passes
    Radius.parse("auto")       chosen by a sweep before the run (melbo.jobs.sweep.goldilocks_radius)

Settings keep the spec text (config.json records what the user asked for); whatever needs the number parses it
here, so that the "value × norm when relative" step and its checks live in one place.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

from melbo.errors import MelboError

KINDS = ("absolute", "relative", "calibrate", "auto")


@dataclass(frozen=True)
class Radius:
    kind: str  # one of KINDS
    value: Optional[float] = None  # absolute and relative only

    @classmethod
    def parse(cls, spec: object) -> "Radius":
        if isinstance(spec, Radius):
            return spec
        if isinstance(spec, bool) or not isinstance(spec, (str, int, float)):
            raise MelboError(f"radius must be text such as 4.0 or 0.5x, got {type(spec).__name__}")
        text = str(spec).strip().lower()
        if text in ("calibrate", "auto"):
            return cls(text)
        relative = text.endswith("x")
        try:
            value = float(text[:-1] if relative else text)
        except ValueError:
            raise MelboError(f"radius {spec!r} is not a number: use e.g. 4.0 (absolute) or 0.5x (relative)") from None
        if not value > 0 or not math.isfinite(value):
            raise MelboError(f"radius must be > 0, got {spec!r}: use e.g. 4.0 or 0.5x")
        return cls("relative" if relative else "absolute", value)

    @property
    def relative(self) -> bool:
        return self.kind == "relative"

    @property
    def numeric(self) -> bool:
        return self.kind in ("absolute", "relative")

    def resolve(self, norm: float) -> float:
        """The absolute R, given the median residual norm at the source block."""
        if not self.numeric:
            raise MelboError(f"radius {self} is not a number yet: it is found by "
                             f"{'a sweep' if self.kind == 'auto' else 'calibration'} first")
        return self.value * norm if self.relative else self.value

    def __str__(self) -> str:
        if not self.numeric:
            return self.kind
        return f"{self.value:g}x" if self.relative else f"{self.value:g}"
