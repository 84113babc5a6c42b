"""sweep.json, typed: what `melbo sweep` measured at each radius and the R it chose (melbo.jobs.sweep writes it;
the report reads it).

    {"relative": bool, "points": [{"radius", "radius_relative", "source", "target", "diversity",
      "median_perplexity", "mean_distance_from_unsteered", "mean_repetition", "fluent"}],
     "chosen": {"radius", "radius_relative", "source", "target"} or null, "reason": str, "fluency_floor": float}
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Optional

from melbo.errors import MelboError
from melbo.io.files import read_json
from melbo.io.jsonfields import Fields
from melbo.io.runconfig import MAX_BLOCKS

SWEEP = "sweep.json"  # in a sweep directory
SWEEP_FIX = "run the sweep again into a new --out"


@dataclass
class SweepChoice:
    """Where a point was measured: R (absolute and relative) and its blocks."""

    radius: float
    radius_relative: float
    source: int
    target: int

    @classmethod
    def from_fields(cls, f: Fields) -> "SweepChoice":
        return cls(f.real("radius", above=0), f.real("radius_relative", above=0), f.whole("source", 0, MAX_BLOCKS),
                   f.whole("target", 0, MAX_BLOCKS))


@dataclass
class SweepPoint(SweepChoice):
    """One measured radius: its run's scores and whether it stays under the fluency floor."""

    diversity: Optional[float] = None
    median_perplexity: Optional[float] = None
    mean_distance_from_unsteered: Optional[float] = None
    mean_repetition: Optional[float] = None
    fluent: Optional[bool] = None

    @classmethod
    def from_fields(cls, f: Fields) -> "SweepPoint":
        where = SweepChoice.from_fields(f)
        scores = {k: f.real(k, default=None) for k in ("diversity", "median_perplexity",
                                                        "mean_distance_from_unsteered", "mean_repetition")}
        return cls(**asdict(where), **scores, fluent=f.flag("fluent", None))

    def at(self, choice: Optional[SweepChoice]) -> bool:
        return choice is not None and (self.radius, self.source, self.target) == (choice.radius, choice.source,
                                                                                  choice.target)


@dataclass
class SweepResult:
    """sweep.json (module docstring), read once with every field checked."""

    relative: bool
    points: list[SweepPoint]
    chosen: Optional[SweepChoice] = None
    reason: str = ""
    fluency_floor: Optional[float] = None

    @classmethod
    def from_dict(cls, raw: object, file: Path | str = SWEEP) -> "SweepResult":
        f = Fields(raw, file, SWEEP_FIX)
        chosen = f.object("chosen", None)
        return cls(f.flag("relative", True), [SweepPoint.from_fields(p) for p in f.objects("points", [])],
                   SweepChoice.from_fields(chosen) if chosen is not None else None, f.text("reason", ""),
                   f.real("fluency_floor", 0, default=None))

    @classmethod
    def load(cls, where: str | Path) -> "SweepResult":
        """The sweep.json of a sweep directory (or the file itself)."""
        file = Path(where) / SWEEP if Path(where).is_dir() else Path(where)
        if not file.is_file():
            raise MelboError(f"{where} holds no {SWEEP}: give the directory the R sweep wrote")
        return cls.from_dict(read_json(file), file)

    def to_dict(self) -> dict:
        return asdict(self)
