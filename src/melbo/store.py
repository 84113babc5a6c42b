"""The run directory: everything a discovery produced, reloadable and resumable.

    config.json          settings, model identity, radius (absolute and relative), versions
    vectors.safetensors  [N, d] steering vectors     (or adapters.safetensors: a [N, h, r], b [N, d, r])
    curves.safetensors   objective per perturbation per step [N, steps + 1]
    checkpoint.safetensors  finished batches of an unfinished run (removed when the run completes)
    completions.jsonl    one line per (perturbation, prompt, sample)
"""

from __future__ import annotations

import errno
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


def check_output_file(path: Path) -> None:
    """Refuse an output file path that is not a new path or a regular file: a write renames over what is there."""
    path = Path(path)
    if path.is_symlink() or (path.exists() and not path.is_file()):
        raise MelboError(f"{path} is not a regular file (a directory, link or device): give a new file path")
    _check_ancestors(path.parent)


def check_output_dir(path: Path) -> None:
    """Refuse an output directory path that is, or lies under, something other than a directory."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise MelboError(f"{path} is a file, not a directory: choose another --out")
    _check_ancestors(path)


def _check_ancestors(path: Path) -> None:
    # The nearest existing ancestor must be a directory, or mkdir fails halfway.
    for folder in (path, *path.parents):
        if folder.exists():
            if not folder.is_dir():
                raise MelboError(f"{folder} is a file, not a directory: choose another --out")
            return


def make_output_dir(path: Path) -> None:
    check_output_dir(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MelboError(f"cannot create {path} ({exc.strerror}): choose another --out") from exc


@contextmanager
def replacing(path: Path) -> Iterator[Path]:
    """A temporary path beside `path`, renamed over it on success and removed on any failure."""
    check_output_file(path)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException as exc:
        tmp.unlink(missing_ok=True)
        if isinstance(exc, (OSError, SafetensorError)):
            raise _write_error(path, exc) from exc
        raise


def _write_error(path: Path, exc: BaseException) -> MelboError:
    reason = getattr(exc, "strerror", None) or str(exc)
    full = getattr(exc, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or "StorageFull" in reason
    fix = f"free space on {path.parent.resolve()}" if full else "choose another --out"
    return MelboError(f"cannot write {path} ({reason}): {fix}")


def atomic_write(path: Path, data: bytes) -> None:
    """Write via a temporary file and rename, so an interruption never leaves a half-written file."""
    with replacing(Path(path)) as tmp:
        tmp.write_bytes(data)


def save_tensors(path: Path, tensors: dict[str, Tensor], metadata: Optional[dict[str, str]] = None) -> None:
    with replacing(Path(path)) as tmp:
        save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)


def read_text(path: Path, what: str = "file", fix: str = "save it as UTF-8") -> str:
    """A UTF-8 text file's contents; a missing, unreadable or non-UTF-8 file is a one-line error."""
    try:
        return Path(path).read_text(encoding="utf-8")
    except UnicodeDecodeError as exc:
        raise MelboError(f"{what} {path} is not UTF-8 text (byte {exc.start}): {fix}") from exc
    except FileNotFoundError as exc:
        raise MelboError(f"{what} {path} does not exist: check the path") from exc
    except OSError as exc:
        raise MelboError(f"cannot read {what} {path} ({exc.strerror}): give a readable text file") from exc


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
    if not path.exists():
        raise MelboError(f"{path.parent} is not a melbo run (no {path.name}): give a run directory")
    try:
        return json.loads(read_text(path, path.name, "restore or delete the run"))
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
        _check_run_config(path / CONFIG, config)
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
        name = "adapters.safetensors" if self.config["method"] == "adapters" else "vectors.safetensors"
        if not (self.path / name).exists():  # --resume would find the run complete and stop: no loop
            raise MelboError(f"run {self.path} is complete but its result {name} is missing: "
                             "run `melbo discover` again into a new --out")
        t = load_tensors(self.path / name)
        if self.config["method"] == "adapters":
            return SteeringAdapters(t["a"], t["b"], float(self.config["radius"]), source)
        return SteeringVectors(t["vectors"], source)

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
    def settings(self) -> dict:
        """The discover settings the run was made with (resuming and completing a run need them)."""
        settings = self.config.get("settings")
        if not isinstance(settings, dict) or "prompts" not in settings:
            raise MelboError(f"{self.path / CONFIG} is not a melbo run config (no settings): "
                             "give a run directory `melbo discover` wrote")
        return settings

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
            text = read_text(file, "completions file", "delete it and it will be generated again")
            return [json.loads(line) for line in text.splitlines() if line.strip()]
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


def _check_run_config(file: Path, config: Any) -> None:
    """A config.json that parses but is not a run's (a list, no model or settings) is a one-line error."""
    required = ("model", "method", "source")
    missing = [k for k in required if k not in config] if isinstance(config, dict) else list(required)
    if not missing:
        model = config["model"]
        missing = [f"model.{k}" for k in ("id", "spec") if not isinstance(model, dict) or k not in model]
    if missing:
        raise MelboError(f"{file} is not a melbo run config (no {', '.join(missing)}): "
                         "give a run directory `melbo discover` wrote")


def _artifact_metadata(config: dict) -> dict:
    keys = ("method", "source", "target", "radius", "radius_relative", "p", "q", "orthogonal", "rank")
    return {"model": config["model"]["id"], **{k: config.get(k) for k in keys}}
