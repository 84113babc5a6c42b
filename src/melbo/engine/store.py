"""The run directory: everything a discovery produced, reloadable and resumable.

    config.json          settings, model identity, radius (absolute and relative), versions
    <artefact file>      the result, in its artefact's own format (`SteeringVectors.FILE`, `SteeringAdapters.FILE`)
    curves.safetensors   objective per perturbation per step [N, steps + 1]
    checkpoint.safetensors  finished batches of an unfinished run (removed when the run completes)
    completions.jsonl    one line per (perturbation, prompt, sample)
"""

from __future__ import annotations

import json
import math
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Optional

import torch
from torch import Tensor

from melbo.errors import MelboError
from melbo.io.files import (
    as_path, check_output_dir, load_metadata, load_tensors, make_output_dir, read_text,
    save_tensors, write_jsonl)
from melbo.engine.intervention import Perturbations, SteeringAdapters, SteeringVectors
from melbo.engine.models import LoadedModel
from melbo.engine.generation import Completion
from melbo.io.jsonfields import SQLITE_MAX, Fields
# LAYER_MAP: map.json, written by melbo.jobs.layermap
from melbo.io.runconfig import LAYER_MAP, ModelRecord, RunConfig  # noqa: F401
from melbo.settings import DiscoverConfig
from melbo.io.benchfile import BENCH  # noqa: F401  (bench.json: its reader's)
from melbo.io.sweepfile import SWEEP  # noqa: F401  (sweep.json: its reader's)

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CURVES = "curves.safetensors"
COMPLETIONS = "completions.jsonl"
METRICS = "metrics.json"  # written by melbo.judging.assess
DIVERGENCE = "divergence.json"  # written by melbo.judging.divergence (diff runs)
CHECKS = "checks.json"  # written by melbo.judging.checkers.check_run (--check)
MONITOR_DIR = "monitor"  # written by melbo.judging.monitor, inside the run unless --out says otherwise
MONITOR_JSON = "monitor.json"
MONITOR_JSONL = "monitor.jsonl"


@dataclass
class Run:
    """A run directory loaded into memory. `steer(i)` applies perturbation i to the run's model."""

    path: Path
    config: RunConfig
    perturbations: Optional[Perturbations] = None
    curves: Optional[Tensor] = None
    model: Optional[LoadedModel] = field(default=None, repr=False)

    # ---- reading
    @classmethod
    def load(cls, path: str | Path, model: Optional[LoadedModel] = None, result: bool = True) -> "Run":
        """The run at `path`; `result=False` leaves its perturbations unread (a report needs only the rest)."""
        path = as_path(path, "a run directory")
        if not path.is_dir():
            raise MelboError(f"run directory {path} does not exist: give the directory `melbo discover` wrote")
        run = cls(path, RunConfig.load(path / CONFIG))
        if (path / CURVES).exists():
            run.curves = load_tensors(path / CURVES)["curves"]
        if result and run.config.complete:
            run.perturbations = run._load_perturbations()
        if model is not None:
            run.attach(model)
        return run

    def _load_perturbations(self) -> Perturbations:
        from melbo.engine.methods import method_class

        kind = method_class(self.config.method).artifact_kind
        if not (self.path / kind.FILE).exists():  # --resume would find the run complete and stop: no loop
            raise MelboError(f"run {self.path} is complete but its result {kind.FILE} is missing: "
                             "run `melbo discover` again into a new --out")
        perturbations = kind.load(self.path / kind.FILE)
        _check_artifact(self.path / kind.FILE, perturbations, self.config.model)
        return perturbations

    def attach(self, model: LoadedModel) -> None:
        """Bind a loaded model to this run, refusing a model other than the one it was trained on."""
        expected = self.config.model.id
        if model.model_id != expected:
            raise MelboError(
                f"run {self.path} was made with model {expected}, not {model.model_id}: load that model "
                f"(--model {self.config.model.spec})"
            )
        recorded = (self.config.provenance or {}).get("model") or {}
        made, given = recorded.get("sha256") if isinstance(recorded, dict) else None, model.weights_sha256
        if made and given and made != given:  # two fine-tunes of one base share an id: their bytes differ
            raise MelboError(f"run {self.path} was made with other weights than {model.spec} (sha256 {made[:12]}…, "
                             f"not {given[:12]}…), though the model id is the same: load the model it was made with")
        self.model = model

    @property
    def settings(self) -> DiscoverConfig:
        """The discover settings the run was made with (resuming and completing a run need them)."""
        return self.config.settings

    @property
    def vectors(self) -> Tensor:
        if self.perturbations is None or not self.perturbations.supports_arithmetic:
            raise MelboError(f"run {self.path} holds no finished steering vectors")
        return self.perturbations.vectors

    def __len__(self) -> int:
        return len(self.perturbations) if self.perturbations is not None else 0

    def completions(self) -> list[dict]:
        """The stored completions (completions.jsonl), one dict per line, every field checked (`Completion`'s
        fields, so `Completion(**row)` holds); [] when there are none yet."""
        file = self.path / COMPLETIONS
        if not file.exists():
            return []
        fix = "delete it and it will be generated again"
        rows = []
        for n, line in enumerate(read_text(file, "completions file", fix).splitlines(), 1):
            if not line.strip():
                continue
            try:
                raw = json.loads(line)
            except json.JSONDecodeError as exc:
                raise MelboError(f"{file} line {n} is corrupt ({exc.msg}): {fix}") from exc
            rows.append(completion_from(Fields(raw, f"{file} line {n}", fix)).to_json())
        return rows

    # ---- steering
    @contextmanager
    def steer(self, index: int, scale: float = 1.0) -> Iterator[None]:
        """Apply perturbation `index` to every row of every forward pass of the run's model (hooks removed on exit)."""
        if self.model is None:
            raise MelboError("this run has no model attached: use Run.load(path, model=load_model(...))")
        if self.perturbations is None:
            raise MelboError(f"run {self.path} is not finished: resume it first")
        if not 0 <= index < len(self.perturbations):
            raise MelboError(f"vector index {index} is out of range: this run has 0..{len(self.perturbations) - 1}")
        # One row of perturbation broadcasts over whatever batch the model sees.
        with self.perturbations.select([index]).apply(self.model, [0], scale):
            yield

    # ---- writing
    @classmethod
    def create(cls, path: str | Path, config: RunConfig, model: Optional[LoadedModel] = None, *,
               restart: bool = False) -> "Run":
        """A new run directory at `path` (absent or empty) holding `config`: the one way a run directory begins.

        `restart`: `path` may hold an unfinished run, which is written over (a control that is cheaper to redo than
        to resume); a finished one is still refused."""
        path = as_path(path, "a run directory")
        check_output_dir(path)
        if path.exists() and any(path.iterdir()) and (not restart or _finished(path)):
            raise MelboError(f"{path} already exists and is not empty: choose another --out")
        make_output_dir(path)
        run = cls(path, config, model=model)
        run.save_config()  # first, so that an interruption from here on leaves a resumable run
        return run

    def save_config(self) -> None:
        self.config.save(self.path / CONFIG)

    def save_result(self, perturbations: Perturbations, curves: Tensor) -> None:
        perturbations.save(self.path / perturbations.FILE, _artifact_metadata(self.config))
        save_tensors(self.path / CURVES, {"curves": curves})
        self.perturbations, self.curves = perturbations, curves
        self.config.status = "complete"
        self.save_config()
        (self.path / CHECKPOINT).unlink(missing_ok=True)

    def save_checkpoint(self, tensors: dict[str, Tensor], batches_done: int) -> None:
        save_tensors(self.path / CHECKPOINT, tensors, {"batches_done": str(batches_done)})

    def load_checkpoint(self) -> tuple[dict[str, Tensor], int]:
        file = self.path / CHECKPOINT
        if not file.exists():
            return {}, 0
        fix = "delete it to restart this run from scratch"
        try:
            done = int(load_metadata(file, fix)["batches_done"])
        except (KeyError, ValueError) as exc:
            raise MelboError(f"{file} is corrupt ({exc}): {fix}") from exc
        if not 0 <= done <= self.config.settings.n_vectors:  # each batch holds at least one perturbation
            raise MelboError(f"{file} is corrupt (batches_done {done} of {self.config.settings.n_vectors} "
                             f"perturbations): {fix}")
        return checked_tensors(file, load_tensors(file), self.config.model.width, fix), done

    def write_completions(self, rows: list[dict]) -> None:
        write_jsonl(self.path / COMPLETIONS, rows)


def completion_from(f: Fields) -> Completion:
    """A completion row (completions.jsonl, metrics.json's random ones), each field checked."""
    return Completion(vector=f.whole("vector", 0, SQLITE_MAX, None), label=f.text("label"),
                      prompt_index=f.whole("prompt_index", 0), prompt=f.text("prompt", ""),
                      sample=f.whole("sample", 0, default=0), text=f.text("text"),
                      tokens=f.whole("tokens", 0, default=0))


def checked_tensors(file: Path, tensors: dict[str, Tensor], width: Optional[int], fix: str) -> dict[str, Tensor]:
    """Tensors read back from a run's file, trusted from here on: floats, finite, and "vectors" [N, width]."""
    for name, t in tensors.items():
        if not t.dtype.is_floating_point:
            raise MelboError(f"{file} holds {name} of {str(t.dtype).removeprefix('torch.')} numbers, not floats: {fix}")
        if name != "curves" and not bool(torch.isfinite(t).all()):  # a diverged objective may be NaN; params not
            raise MelboError(f"{file} holds NaN or infinite {name}: {fix}")
    vectors = tensors.get("vectors")
    if vectors is not None and (vectors.dim() != 2 or (width is not None and vectors.shape[-1] != width)):
        raise MelboError(f"{file} holds vectors of shape {tuple(vectors.shape)}, not [N, {width}]: {fix}")
    return tensors


def _finished(path: Path) -> bool:
    try:
        return RunConfig.load(path / CONFIG).complete
    except MelboError:  # no config, or a damaged one: nothing finished to keep
        return False


def _check_artifact(file: Path, perturbations: Perturbations, model: ModelRecord) -> None:
    """Every use of a run's result (steering, export, catalogue) trusts it: float tensors, finite, of the width of
    the model the run names. A hand-edited or foreign file fails here, once, not as garbage in a GGUF."""
    fix = "re-run the discovery into a new --out"
    if isinstance(perturbations, SteeringVectors):
        tensors, ranks, width = [perturbations.vectors], (2,), perturbations.vectors.shape[-1]
    else:
        tensors, ranks = [perturbations.a, perturbations.b], (3, 3)
        width = perturbations.b.shape[1] if perturbations.b.dim() > 1 else None
        if not math.isfinite(perturbations.radius):
            raise MelboError(f"{file} records a radius of {perturbations.radius}: {fix}")
    for t in tensors:
        if not t.dtype.is_floating_point:
            raise MelboError(f"{file} holds {str(t.dtype).removeprefix('torch.')} numbers, not floats: {fix}")
        if not bool(torch.isfinite(t).all()):
            raise MelboError(f"{file} holds NaN or infinite numbers: {fix}")
    expected = model.width
    if [t.dim() for t in tensors] != list(ranks) or (expected is not None and width != expected):
        raise MelboError(f"{file} holds perturbations of shape {tuple(tensors[-1].shape)}, not of the width "
                         f"{expected} of model {model.id}: {fix}")


def _artifact_metadata(config: RunConfig) -> dict:
    """What an artefact file says about itself (safetensors metadata), for a reader without the config."""
    from melbo.engine.methods import method_class

    adapters = method_class(config.method).artifact_kind is SteeringAdapters
    return {"model": config.model.id, "method": config.method, "source": config.source, "target": config.target,
            "radius": config.radius, "radius_relative": config.radius_relative, "p": config.settings.p,
            "q": config.settings.q, "orthogonal": config.settings.orthogonal,
            "rank": config.settings.rank if adapters else None}
