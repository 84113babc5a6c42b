"""A run's config.json, typed: the settings asked for, what the run resolved, and where it came from.

    settings             the `DiscoverConfig` the run was made with (what the user asked for, verbatim)
    model, reference     the model trained on (and a contrastive run's reference), as `LoadedModel.describe()` gives
    source, target       the resolved block indices (settings may leave them to the defaults)
    radius, radius_relative, residual_norm, precision   resolved once the run has measured them
    status, created, melbo_version, versions, provenance   what happened, when, with what
    random, check, radius_sweep, ...   what the job after training asked for (a resume repeats it)
    record               the method's own facts (Jacobian singular values, DCT scores), flat in the file

`RunConfig.from_dict` reads a parsed config.json (old formats first pass through `migrate`), checking every field
(types, finite floats, integer ranges), so that code after it reads attributes, not `.get()` chains. `to_dict`
writes the same format back. A layer map's map.json (`MapConfig`, `MapSettings`) is read the same way, here
rather than in `melbo.jobs.layermap`, so that the report can read it without importing the job that writes it. No torch
import: the catalogue and the CLI read configs cheaply.
"""

from __future__ import annotations

import dataclasses
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from melbo.checks import MAX_COUNT, check_fields
from melbo.errors import MelboError
from melbo.io.jsonfields import SQLITE_MAX, Fields
from melbo.positions import Positions, Spec
from melbo.radius import Radius
from melbo.settings import DEFAULTS, MAP_ITERATIONS, MAP_K, DiscoverConfig

STATUSES = ("running", "complete")
PRECISIONS = ("fp32", "bf16")
MAX_BLOCKS = 100_000  # far beyond any model's depth: a larger block index is a corrupt file
MAX_WIDTH = 10_000_000
FIX = "restore it, or re-run the discovery into a new --out"

# Written once inside `settings` and (by every version before the typed config) again at the top level.
DUPLICATED = ("method", "p", "q", "orthogonal", "rank", "contrast")
_SETTINGS = tuple(f.name for f in dataclasses.fields(DiscoverConfig))


@dataclass
class ModelRecord:
    """A model as a run names it: `spec` loads it again, `id` is what a run checks a loaded model against."""

    id: str
    spec: str
    hash: Optional[str] = None
    architecture: Optional[str] = None
    depth: Optional[int] = None
    width: Optional[int] = None
    dtype: Optional[str] = None
    system: Optional[str] = None  # the system prompt every conversation opened with (LoadedModel.system)
    extra: dict = field(default_factory=dict)  # fields a newer version describes (a hub revision, ...), kept

    @classmethod
    def from_fields(cls, f: Fields) -> "ModelRecord":
        known = ("id", "spec", "hash", "architecture", "depth", "width", "dtype", "system")
        spec = f.text("spec")
        return cls(id=f.text("id"), spec=spec, hash=f.text("hash", None), architecture=f.text("architecture", None),
                   depth=f.whole("depth", 1, MAX_BLOCKS, None), width=f.whole("width", 1, MAX_WIDTH, None),
                   dtype=f.text("dtype", None), system=f.text("system", None), extra=f.rest(known))

    @classmethod
    def from_dict(cls, raw: Any, file: Path | str = "config.json", where: str = "model") -> "ModelRecord":
        return cls.from_fields(Fields(raw, file, FIX, where))

    def to_dict(self) -> dict:
        out = {k: v for k, v in asdict(self).items() if k != "extra" and not (k == "system" and v is None)}
        return {**out, **self.extra}


@dataclass
class RunConfig:
    """config.json of a run (module docstring). Mutable while the run trains; checked on every save."""

    settings: DiscoverConfig
    model: ModelRecord
    source: int
    target: int
    status: str = "running"
    created: Optional[str] = None
    melbo_version: Optional[str] = None
    reference: Optional[ModelRecord] = None
    radius: Optional[float] = None  # absolute R, once resolved
    radius_relative: Optional[float] = None  # R / residual_norm
    residual_norm: Optional[float] = None  # median residual norm at the source block
    radius_calibration: Optional[dict] = None  # how a calibrated R was found (melbo.engine.calibrate)
    precision: Optional[str] = None  # of the training matmuls, once resolved: a resume keeps it
    versions: dict = field(default_factory=dict)  # torch, transformers, python
    provenance: dict = field(default_factory=dict)  # where the inputs came from (hub revision, content hashes, ...)
    random: Optional[int] = None  # random vectors the job after training compares with (assess, diff)
    random_control: bool = False  # the run is itself random vectors (a control arm), not a discovery
    check: Optional[str] = None  # the checker the job runs over completions (melbo.judging.checkers)
    radius_sweep: Optional[str] = None  # the sweep directory that chose R (radius "auto")
    layer_map: Optional[str] = None  # the map a pair was opened from (melbo.jobs.layermap.open_pair)
    record: dict = field(default_factory=dict)  # the method's facts, and fields of newer versions: kept as they are

    # ---- the settings, under the names the rest of melbo reads
    @property
    def method(self) -> str:
        return self.settings.method

    @property
    def prompts(self) -> list[str]:
        return self.settings.prompts

    @property
    def chat(self) -> Optional[bool]:
        return self.settings.chat

    @property
    def seed(self) -> int:
        return self.settings.seed

    @property
    def contrast(self) -> Optional[str]:
        return self.settings.contrast

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @property
    def measured(self) -> bool:
        """Whether the run has resolved its radius (a run interrupted before that has not)."""
        return self.radius is not None and self.residual_norm is not None

    # ---- reading and writing
    @classmethod
    def from_dict(cls, raw: Any, file: Path | str = "config.json") -> "RunConfig":
        """The typed config of a parsed config.json (any version), or one line naming the file, field and fix."""
        required = ("model", "settings", "source", "target")
        missing = [k for k in required if k not in raw] if isinstance(raw, dict) else list(required)
        if missing:
            raise MelboError(f"{file} is not a melbo run config (no {', '.join(missing)}): "
                             "give a run directory `melbo discover` wrote")
        f = Fields(migrate(raw), file, FIX)
        model = ModelRecord.from_fields(f.object("model"))
        reference = f.object("reference", None)
        depth = model.depth or MAX_BLOCKS
        config = cls(
            settings=_settings(f.object("settings")), model=model,
            source=f.whole("source", 0, depth - 1), target=f.whole("target", 0, depth - 1),
            status=f.text("status", "running", STATUSES), created=f.text("created", None),
            melbo_version=f.text("melbo_version", None),
            reference=ModelRecord.from_fields(reference) if reference is not None else None,
            radius=f.real("radius", above=0, default=None), radius_relative=f.real("radius_relative", above=0,
                                                                                   default=None),
            residual_norm=f.real("residual_norm", above=0, default=None),
            radius_calibration=f.mapping("radius_calibration", None),
            precision=f.text("precision", None, PRECISIONS), versions=f.mapping("versions", None) or {},
            provenance=f.mapping("provenance", None) or {}, random=f.whole("random", 0, MAX_COUNT, None),
            random_control=f.flag("random_control", False), check=f.text("check", None),
            radius_sweep=f.text("radius_sweep", None), layer_map=f.text("layer_map", None),
            record=f.rest(_KNOWN),
        )
        config.validate(file)
        return config

    def validate(self, file: Path | str = "config.json") -> None:
        """The relations between fields that no one field shows."""
        if self.source >= self.target:
            raise MelboError(f"{file} is malformed (source block {self.source} is not before target "
                             f"{self.target}): {FIX}")
        if self.complete and (self.radius is None or self.radius_relative is None):
            raise MelboError(f"{file} is malformed (a complete run without radius and radius_relative): {FIX}")

    def to_dict(self) -> dict:
        """config.json as written: the typed fields, then the method's record flat beside them."""
        out = {
            "melbo_version": self.melbo_version, "created": self.created, "status": self.status,
            "model": self.model.to_dict(),
            "reference": self.reference.to_dict() if self.reference is not None else None,
            "source": self.source, "target": self.target,
            "radius": self.radius, "radius_relative": self.radius_relative, "residual_norm": self.residual_norm,
            "precision": self.precision, "settings": asdict(self.settings), "versions": self.versions,
            "provenance": self.provenance,
        }
        optional = {"radius_calibration": self.radius_calibration, "random": self.random,
                    "random_control": self.random_control or None, "check": self.check,
                    "radius_sweep": self.radius_sweep, "layer_map": self.layer_map}
        out.update({k: v for k, v in optional.items() if v is not None})
        clash = set(self.record) & set(out)
        if clash:  # a method's record may not overwrite a typed field
            raise MelboError(f"the method's record repeats config fields {sorted(clash)}: rename them in the method")
        return {**out, **self.record}

    @classmethod
    def load(cls, file: Path) -> "RunConfig":
        from melbo.io.files import read_json

        return cls.from_dict(read_json(file), file)

    def save(self, file: Path) -> None:
        """Write config.json, refusing a config that would not load again (checked as `from_dict` checks)."""
        from melbo.io.files import write_json
        from melbo.numbers import jsonable

        data = jsonable(self.to_dict())
        RunConfig.from_dict(data, file)
        write_json(file, data)


_KNOWN = (*(f.name for f in dataclasses.fields(RunConfig) if f.name != "record"), *DUPLICATED)


def migrate(raw: dict) -> dict:
    """A config.json of any earlier version, in today's format (a new dict; the argument is left as it was).

    Earlier versions wrote method, p, q, orthogonal, rank and contrast twice (at the top and in settings): the
    settings copy is kept, and the top one fills it where the settings lack it. A random-vector control run was
    marked `"random": true`, which also named the random baseline's size: it is `random_control` now.
    """
    config = dict(raw)
    settings = dict(config["settings"]) if isinstance(config.get("settings"), dict) else config.get("settings")
    for key in DUPLICATED:
        value = config.pop(key, None)
        if isinstance(settings, dict) and key not in settings and value is not None:
            settings[key] = value
    if settings is not None:
        config["settings"] = settings
    if config.get("random") is True:
        config["random_control"] = True
        del config["random"]
    return config


def _settings(f: Fields) -> DiscoverConfig:
    """The settings of a run, checked as the library checks them on the way in (types, then prompts)."""
    unknown = [k for k in f.raw if k not in _SETTINGS]
    if unknown:
        raise f.error(f"settings.{unknown[0]}", "is not a setting of this melbo version")
    prompts = f.texts("prompts")
    if not prompts:
        raise f.error("settings.prompts", "is empty")
    try:
        settings = DiscoverConfig(**f.raw)
        check_fields(settings)
        Radius.parse(settings.radius)
    except MelboError as exc:
        raise f.error("settings", f"are invalid: {exc}") from None
    for name in ("n_vectors", "steps", "batch_size", "rank", "max_new_tokens", "power_iterations"):
        f.check_whole(f"settings.{name}", getattr(settings, name), 1, MAX_COUNT)  # as discovery checks them
    f.check_whole("settings.seed", settings.seed, -(2**40), 2**40)  # × 1_000_003 + batch stays a 64-bit seed
    return settings


# ------------------------------------------------------------------------------------------------ a layer map
LAYER_MAP = "map.json"  # in a layer-map directory, written by melbo.jobs.layermap


@dataclass(frozen=True)
class MapSettings:
    """Everything a pair's result depends on, besides the model: stored in map.json, sent to Ray workers."""

    prompts: list[str]
    sources: list[int]
    targets: list[int]
    k: int = MAP_K
    iterations: int = MAP_ITERATIONS
    seed: int = 0
    chat: Optional[bool] = None
    positions: Spec = DEFAULTS.positions

    @property
    def pairs(self) -> list[tuple[int, int]]:
        return [(s, t) for s in self.sources for t in self.targets if s < t]


MAP_FIX = "map again into a new --out"


@dataclass
class MapConfig:
    """map.json: a map's settings, model and progress, read once with every field checked."""

    settings: MapSettings
    model: ModelRecord
    status: str = "running"
    pairs: int = 0  # how many (source, target) pairs the map covers
    tokens: int = 1  # token positions J stacks per pair (the gain divides σ by its square root)
    melbo_version: Optional[str] = None
    created: Optional[str] = None
    versions: dict = field(default_factory=dict)

    @property
    def complete(self) -> bool:
        return self.status == "complete"

    @classmethod
    def from_dict(cls, raw: object, file: Path | str = LAYER_MAP) -> "MapConfig":
        f = Fields(raw, file, MAP_FIX)
        model = ModelRecord.from_fields(f.object("model"))
        return cls(_map_settings(f.object("settings"), model.depth or MAX_BLOCKS), model,
                   f.text("status", "running", ("running", "complete")), f.whole("pairs", 0, MAX_COUNT, 0),
                   f.whole("tokens", 1, SQLITE_MAX, 1), f.text("melbo_version", None), f.text("created", None),
                   f.mapping("versions", None) or {})

    @classmethod
    def load(cls, path: Path) -> "MapConfig":
        """The map.json of a map directory."""
        from melbo.io.files import read_json

        return cls.from_dict(read_json(path / LAYER_MAP), path / LAYER_MAP)

    def to_dict(self) -> dict:
        return {"kind": "layer_map", "status": self.status, "melbo_version": self.melbo_version,
                "created": self.created, "model": self.model.to_dict(), "settings": asdict(self.settings),
                "pairs": self.pairs, "tokens": self.tokens, "versions": self.versions}

    def save(self, path: Path) -> None:
        from melbo.io.files import write_json

        write_json(path / LAYER_MAP, self.to_dict())


def _map_settings(s: Fields, depth: int) -> MapSettings:
    def blocks(key: str) -> list[int]:
        return [s.check_whole(f"settings.{key}[{i}]", v, 0, depth - 1) for i, v in enumerate(s.items(key))]

    settings = MapSettings(s.texts("prompts"), blocks("sources"), blocks("targets"),
                           s.whole("k", 1, MAX_COUNT, MAP_K), s.whole("iterations", 1, MAX_COUNT, MAP_ITERATIONS),
                           s.whole("seed", default=0), s.flag("chat", None), s.raw.get("positions", "all"))
    try:
        Positions.parse(settings.positions).check_count(len(settings.prompts))
    except MelboError as exc:
        raise s.error("settings.positions", f"are invalid: {exc}") from None
    return settings
