"""The run directory: everything a discovery produced, reloadable and resumable.

    config.json          settings, model identity, radius (absolute and relative), versions
    vectors.safetensors  [N, d] steering vectors     (or adapters.safetensors: a [N, h, r], b [N, d, r])
    curves.safetensors   objective per perturbation per step [N, steps + 1]
    checkpoint.safetensors  finished batches of an unfinished run (removed when the run completes)
    completions.jsonl    one line per (perturbation, prompt, sample)
"""

from __future__ import annotations

import json
import os
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator, Optional

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import Tensor

from melbo.errors import MelboError
from melbo.intervention import Perturbations, SteeringAdapters, SteeringVectors
from melbo.models import LoadedModel

CONFIG = "config.json"
CHECKPOINT = "checkpoint.safetensors"
CURVES = "curves.safetensors"
COMPLETIONS = "completions.jsonl"
METRICS = "metrics.json"  # written by melbo.assess
SWEEP = "sweep.json"  # in a sweep directory, written by melbo.sweep
BENCH = "bench.json"  # written by melbo.bench


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interruption never leaves a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    tmp = path.with_name(path.name + ".tmp")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


def load_tensors(path: Path) -> dict[str, Tensor]:
    if not path.exists():
        raise MelboError(f"{path} is missing: the run is incomplete; re-run or --resume it")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as exc:
        raise MelboError(f"{path} is corrupt ({exc}): delete it and re-run (or --resume) this run") from exc


def write_json(path: Path, obj: Any) -> None:
    atomic_write(path, (json.dumps(obj, indent=2, sort_keys=False) + "\n").encode())


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError as exc:
        raise MelboError(f"{path.parent} is not a melbo run (no {path.name}): give a run directory") from exc
    except json.JSONDecodeError as exc:
        raise MelboError(f"{path} is corrupt ({exc.msg}): restore or delete the run") from exc


def artifact_tensors(perturbations: Perturbations) -> tuple[str, dict[str, Tensor]]:
    if isinstance(perturbations, SteeringVectors):
        return "vectors.safetensors", {"vectors": perturbations.vectors}
    return "adapters.safetensors", {"a": perturbations.a, "b": perturbations.b}


@dataclass
class Run:
    """A run directory loaded into memory. `steer(i)` applies perturbation i to the run's model."""

    path: Path
    config: dict
    perturbations: Optional[Perturbations] = None
    curves: Optional[Tensor] = None
    model: Optional[LoadedModel] = field(default=None, repr=False)

    # ---- reading
    @classmethod
    def load(cls, path: str | Path, model: Optional[LoadedModel] = None) -> "Run":
        path = Path(path)
        if not path.is_dir():
            raise MelboError(f"run directory {path} does not exist: give the directory `melbo discover` wrote")
        config = read_json(path / CONFIG)
        run = cls(path, config)
        if (path / CURVES).exists():
            run.curves = load_tensors(path / CURVES)["curves"]
        if config.get("status") == "complete":
            run.perturbations = run._load_perturbations()
        if model is not None:
            run.attach(model)
        return run

    def _load_perturbations(self) -> Perturbations:
        source = int(self.config["source"])
        if self.config["method"] == "adapters":
            t = load_tensors(self.path / "adapters.safetensors")
            return SteeringAdapters(t["a"], t["b"], float(self.config["radius"]), source)
        return SteeringVectors(load_tensors(self.path / "vectors.safetensors")["vectors"], source)

    def attach(self, model: LoadedModel) -> None:
        """Bind a loaded model to this run, refusing a model other than the one it was trained on."""
        expected = self.config["model"]["id"]
        if model.model_id != expected:
            raise MelboError(
                f"run {self.path} was made with model {expected}, not {model.model_id}: load that model "
                f"(--model {self.config['model']['spec']})"
            )
        self.model = model

    @property
    def vectors(self) -> Tensor:
        if not isinstance(self.perturbations, SteeringVectors):
            raise MelboError(f"run {self.path} holds no finished steering vectors")
        return self.perturbations.vectors

    def __len__(self) -> int:
        return len(self.perturbations) if self.perturbations is not None else 0

    def completions(self) -> list[dict]:
        file = self.path / COMPLETIONS
        if not file.exists():
            return []
        try:
            return [json.loads(line) for line in file.read_text().splitlines() if line.strip()]
        except json.JSONDecodeError as exc:
            raise MelboError(f"{file} is corrupt ({exc.msg}): delete it and it will be generated again") from exc

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
    def save_config(self) -> None:
        write_json(self.path / CONFIG, self.config)

    def save_result(self, perturbations: Perturbations, curves: Tensor) -> None:
        name, tensors = artifact_tensors(perturbations)
        save_tensors(self.path / name, tensors, {"melbo": json.dumps(_artifact_metadata(self.config))})
        save_tensors(self.path / CURVES, {"curves": curves})
        self.perturbations, self.curves = perturbations, curves
        self.config["status"] = "complete"
        self.save_config()
        (self.path / CHECKPOINT).unlink(missing_ok=True)

    def save_checkpoint(self, tensors: dict[str, Tensor], batches_done: int) -> None:
        save_tensors(self.path / CHECKPOINT, tensors, {"batches_done": str(batches_done)})

    def load_checkpoint(self) -> tuple[dict[str, Tensor], int]:
        file = self.path / CHECKPOINT
        if not file.exists():
            return {}, 0
        from safetensors import safe_open

        try:
            with safe_open(str(file), "pt") as f:
                done = int(f.metadata()["batches_done"])
        except (SafetensorError, OSError, KeyError, ValueError) as exc:
            raise MelboError(f"{file} is corrupt ({exc}): delete it to restart this run from scratch") from exc
        return load_tensors(file), done

    def write_completions(self, rows: list[dict]) -> None:
        atomic_write(self.path / COMPLETIONS, "".join(json.dumps(r) + "\n" for r in rows).encode())


def _artifact_metadata(config: dict) -> dict:
    keys = ("method", "source", "target", "radius", "radius_relative", "p", "q", "orthogonal", "rank")
    return {"model": config["model"]["id"], **{k: config.get(k) for k in keys}}
