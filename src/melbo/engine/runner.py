"""Discovery runs: settings in, a run directory out, trained batch by batch with a checkpoint after each.

`discover(lm, prompts, ...)` validates everything before any work, resolves the radius (absolute, relative
to the median residual norm at the source block: "0.5x", or "calibrate": `melbo.engine.calibrate`), trains N
perturbations in batches of `batch_size` (each batch one `optimise` call), and checkpoints after every batch
so that `resume(path)` loses at most one. Batch b starts from a generator seeded by (seed, b): the same seed
gives the same perturbations, bitwise on CPU, whether or not the run was interrupted.
"""

from __future__ import annotations

import datetime as _dt
import math
import platform
from copy import deepcopy
from dataclasses import replace
from pathlib import Path
from typing import Callable, Optional, Sequence

import torch
from torch import Tensor

from melbo import __version__
from melbo.engine.calibrate import calibrate_radius, is_calibrate
from melbo.radius import Radius
from melbo.engine.calibrate import check_method as check_calibrated_method
from melbo.checks import check_count_bound, check_fields
from melbo.errors import MelboError
from melbo.engine.intervention import SteeringAdapters
from melbo.engine.methods import METHODS, Method, Params, Setting, method_class
from melbo.engine.models import LoadedModel, resolve_precision
from melbo.engine.contrastive import DEFAULT_FORM, FORMS, check_pair
from melbo.engine.objective import residual_norm
from melbo.engine.prompts import PromptBatch, check_prompt_list, encode
from melbo.settings import DiscoverConfig
from melbo.io.files import check_output_dir, load_tensors, save_tensors
from melbo.io.runconfig import ModelRecord, RunConfig
from melbo.engine.store import Run, checked_tensors

Progress = Callable[[dict], None]
PREVIOUS = "previous.safetensors"  # in a run directory: the --orthogonal-to vectors, for resume


def default_layers(depth: int) -> tuple[int, int]:
    source = min(8, depth // 3)
    return source, max(source + 1, depth - 8)


def parse_radius(spec: str) -> tuple[float, bool]:
    """'4.0' → (4.0, absolute); '0.5x' → (0.5, relative to the residual norm); see `melbo.radius.Radius`."""
    radius = numeric_radius(spec)
    return radius.value, radius.relative


def numeric_radius(spec: str) -> Radius:
    """The radius of a spec that must already be a number: auto and calibrate are refused with the fix."""
    radius = Radius.parse(spec)
    if radius.kind == "auto":
        raise MelboError("radius 'auto' needs a sweep: pass melbo.jobs.sweep.goldilocks_radius(lm, prompts) as radius")
    if radius.kind == "calibrate":
        raise MelboError("radius 'calibrate' is measured by a discovery run (melbo.engine.calibrate): "
                         "give a number here, e.g. 0.2x")
    return radius


def validate(lm: LoadedModel, cfg: DiscoverConfig, earlier: int = 0) -> tuple[int, int]:
    """Check every setting before any work; return the resolved (source, target).

    `earlier`: how many vectors from earlier runs the new ones must stay orthogonal to.
    """
    check_fields(cfg)  # types first: n_vectors=2.5 or p=nan would fail mid-run, leaving a "running" directory
    check_prompt_list(cfg.prompts)
    method = method_class(cfg.method)
    if cfg.orthogonal not in ("hard", "soft", "none"):
        raise MelboError(f"unknown orthogonality {cfg.orthogonal!r}: use hard, soft or none")
    for name in ("n_vectors", "steps", "batch_size", "rank", "max_new_tokens", "power_iterations"):
        if getattr(cfg, name) <= 0:
            raise MelboError(f"{name.replace('_', '-')} must be ≥ 1, got {getattr(cfg, name)}")
        check_count_bound(name, getattr(cfg, name))
    for name in ("p", "q", "lr"):
        if not getattr(cfg, name) > 0:
            raise MelboError(f"{name} must be > 0, got {getattr(cfg, name)}")
    if cfg.soft_weight < 0:
        raise MelboError(f"soft-weight must be ≥ 0, got {cfg.soft_weight}")
    if cfg.contrast is not None:
        _validate_contrast(cfg, method)
    if is_calibrate(cfg.radius):
        check_calibrated_method(cfg.method, method.artifact_kind)
    else:
        parse_radius(cfg.radius)
    resolve_precision(cfg.precision, lm.device)
    default_source, default_target = default_layers(lm.depth)
    source = lm.layer(default_source if cfg.source is None else cfg.source, "source layer")
    target = lm.layer(default_target if cfg.target is None else cfg.target, "target layer")
    if source >= target:
        raise MelboError(f"source layer {source} must come before target layer {target}: pick source < target")
    method.check(cfg, lm, earlier)
    return source, target


def _validate_contrast(cfg: DiscoverConfig, method: type[Method]) -> None:
    if cfg.contrast not in FORMS:
        raise MelboError(f"unknown contrast {cfg.contrast!r}: use one of {', '.join(FORMS)}")
    if not method.supports_contrast:
        able = " or ".join(name for name, m in METHODS.items() if m.supports_contrast)
        raise MelboError(f"contrastive discovery cannot use method {cfg.method!r}: use --method {able}")
    if not cfg.contrast_weight >= 0 or not math.isfinite(cfg.contrast_weight):
        raise MelboError(f"contrast-weight must be a finite number ≥ 0, got {cfg.contrast_weight}")


def _reference(cfg: DiscoverConfig, lm: LoadedModel, reference: Optional[LoadedModel]) -> Optional[LoadedModel]:
    """The reference model of a contrastive run, checked against the audited one (None for plain discovery)."""
    if reference is not None and cfg.contrast is None:
        cfg.contrast = DEFAULT_FORM
    if cfg.contrast is None:
        return None
    if reference is None:
        raise MelboError(f"contrast {cfg.contrast!r} compares two models: give the reference model "
                         "(--reference, or reference= in the API)")
    check_pair(lm, reference)
    return reference


def default_run_dir(lm: LoadedModel) -> Path:
    stamp = _dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{stamp}-{lm.model_id.split('@')[0].replace('/', '_')}"


def discover(
    lm: LoadedModel,
    prompts: Sequence[str] | DiscoverConfig,
    out: str | Path | None = None,
    *,
    previous: Optional[Tensor] = None,
    reference: Optional[LoadedModel] = None,
    progress: Optional[Progress] = None,
    record: Optional[dict] = None,
    **settings,
) -> Run:
    """Train perturbations on `prompts` and write a run directory. Settings are `DiscoverConfig` fields.

    With a `reference` model the run is contrastive (`melbo.engine.contrastive`): the objective rewards changes the
    audited model `lm` makes and the reference does not (`contrast` picks the form; default "difference").
    `record`: more `RunConfig` fields, saved with the first config (diff's random count, which its resume reuses).
    """
    if isinstance(prompts, DiscoverConfig) and settings:
        raise MelboError(f"pass settings either in the DiscoverConfig or as keywords, not both ({', '.join(settings)})")
    if not isinstance(prompts, DiscoverConfig):  # a bare string would train on one prompt per character
        prompts = DiscoverConfig.build(check_prompt_list(prompts), **settings)
    cfg = prompts
    reference = _reference(cfg, lm, reference)
    source, target = validate(lm, cfg, len(previous) if previous is not None else 0)
    path = Path(out) if out is not None else default_run_dir(lm)
    check_output_dir(path)
    if path.exists() and any(path.iterdir()):
        raise MelboError(f"{path} already exists and is not empty: choose another --out or use --resume {path}")
    if previous is not None and previous.shape[-1] != lm.width:
        raise MelboError(f"earlier vectors have width {previous.shape[-1]}, the model {lm.width}: use this model's")
    batch = encode(lm, cfg.prompts, cfg.chat, cfg.positions)  # validates prompts and token positions
    run = Run.create(path, replace(_initial_config(lm, cfg, source, target, reference), **(record or {})), model=lm)
    if previous is not None:
        save_tensors(path / PREVIOUS, {"vectors": previous})
    return _train(run, lm, batch, reference, previous, progress)


def resume(path: str | Path, lm: LoadedModel, progress: Optional[Progress] = None,
           reference: Optional[LoadedModel] = None) -> Run:
    """Continue an interrupted run from its last finished batch (a contrastive run needs its reference model)."""
    run = Run.load(path, model=lm)
    if run.config.complete:
        return run
    if lm.system != run.config.model.system:  # the rest of the run would read other prompts than its start
        raise MelboError(f"run {run.path} was made with system prompt {run.config.model.system!r}, not "
                         f"{lm.system!r}: resume it with the one it was made with (--system-prompt)")
    cfg = deepcopy(run.settings)  # _reference may fill in the contrast: the recorded settings stay as they were
    if cfg.contrast is not None:
        reference = _reference(cfg, lm, reference)
        _check_recorded_reference(run, reference)
    prev_file = run.path / PREVIOUS
    previous = _previous(prev_file, lm) if prev_file.exists() else None
    validate(lm, cfg, len(previous) if previous is not None else 0)
    batch = encode(lm, cfg.prompts, cfg.chat, cfg.positions)
    return _train(run, lm, batch, reference, previous, progress)


def _previous(file: Path, lm: LoadedModel) -> Tensor:
    fix = "restore it from the vectors the run was told to stay orthogonal to, or start a new run"
    tensors = checked_tensors(file, load_tensors(file), lm.width, fix)
    if "vectors" not in tensors:
        raise MelboError(f"{file} holds no vectors: {fix}")
    return tensors["vectors"]


def _check_recorded_reference(run: Run, reference: LoadedModel) -> None:
    recorded = run.config.reference
    if recorded is None:
        raise MelboError(f"run {run.path} is contrastive but names no reference model: re-run the diff into a new --out")
    if reference.model_id != recorded.id:
        raise MelboError(f"run {run.path} was contrasted with reference {recorded.id}, not {reference.model_id}: "
                         f"give that reference (--reference {recorded.spec})")


def _initial_config(lm: LoadedModel, cfg: DiscoverConfig, source: int, target: int,
                    reference: Optional[LoadedModel] = None) -> RunConfig:
    import transformers

    return RunConfig(
        settings=deepcopy(cfg), model=ModelRecord.from_dict(lm.describe()), source=source, target=target,
        reference=ModelRecord.from_dict(reference.describe(), where="reference") if reference is not None else None,
        melbo_version=__version__, created=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        status="running",
        versions={"torch": torch.__version__, "transformers": transformers.__version__,
                  "python": platform.python_version()},
        provenance={"model": lm.provenance, **({"reference": reference.provenance} if reference is not None else {})},
    )


def _record_radius(run: Run, lm: LoadedModel, batch: PromptBatch) -> None:
    config = run.config
    norm = residual_norm(lm, batch, config.source)
    if is_calibrate(config.settings.radius):
        found = calibrate_radius(lm, batch, config.source, config.target, norm, seed=config.seed)
        config.radius_calibration = found.record()
        radius = found.radius
    else:
        radius = numeric_radius(config.settings.radius).resolve(norm)  # auto and calibrate are settled before this
    config.radius, config.radius_relative, config.residual_norm = radius, radius / norm, norm


def _train(run: Run, lm: LoadedModel, batch: PromptBatch, reference: Optional[LoadedModel],
           previous: Optional[Tensor], progress: Optional[Progress]) -> Run:
    """Fit the run's perturbations batch by batch, checkpointing after each, from wherever the run stopped."""
    config = run.config
    cfg = deepcopy(config.settings)
    cfg.precision = config.precision or cfg.precision  # a resumed run keeps the precision it began at
    if not config.measured:  # a new run, or one interrupted before the radius was recorded
        _record_radius(run, lm, batch)
    setting = Setting.of(cfg, config.source, config.radius, lm.width, config.residual_norm)
    method = method_class(cfg.method).create(lm, setting)
    objective = method.objective(lm, batch, config.target, cfg, reference)
    config.precision = objective.precision
    run.save_config()
    done, batches_done = run.load_checkpoint()
    size = cfg.batch_size if method.batched else cfg.n_vectors
    n_batches = math.ceil(cfg.n_vectors / size)
    for b in range(batches_done, n_batches):
        n = min(size, cfg.n_vectors - b * size)
        generator = torch.Generator().manual_seed(cfg.seed * 1_000_003 + b)
        on_step = _step_progress(progress, b, n_batches, method.steps, n)
        fit = method.fit(objective, n, _predecessors(previous, done), generator, on_step)
        config.record.update(fit.record)
        done = _append(done, {**fit.params, "curves": fit.curves})
        run.save_checkpoint(done, b + 1)
    curves = done.pop("curves")
    run.save_result(method.artifact(done), curves)
    return run


def _step_progress(progress: Optional[Progress], batch: int, batches: int, steps: int, n: int):
    if progress is None:
        return None
    return lambda step, values: progress({"batch": batch, "batches": batches, "step": step, "steps": steps,
                                          "objective": float(values.mean()), "n": n})


def _predecessors(previous: Optional[Tensor], done: dict[str, Tensor]) -> Optional[Params]:
    """Vectors every new vector must be orthogonal to: earlier runs' and this run's finished batches."""
    parts = [t for t in (previous, done.get("vectors")) if t is not None]
    return {"vectors": torch.cat(parts)} if parts else None


def _append(done: dict[str, Tensor], new: dict[str, Tensor]) -> dict[str, Tensor]:
    return {k: torch.cat([done[k], v]) if k in done else v for k, v in new.items()}


def write_random_run(lm: LoadedModel, prompts: Sequence[str], out: str | Path, *, n: int, radius: str, seed: int = 0,
                     **settings) -> Run:
    """A finished run of `n` random vectors of norm R at the source (uniform on the sphere): the control that a
    discovery is compared with, as a run directory that generate, chat and export accept like any other."""
    from melbo.engine.arithmetic import random_vectors

    cfg = DiscoverConfig.build(check_prompt_list(prompts), n_vectors=n, radius=radius, seed=seed, steps=1,
                               orthogonal="none", **settings)  # steps: none taken, 1 passes validation
    source, target = validate(lm, cfg)
    batch = encode(lm, cfg.prompts, cfg.chat, cfg.positions)
    config = replace(_initial_config(lm, cfg, source, target), random_control=True, precision="fp32")
    run = Run.create(out, config, model=lm, restart=True)  # an interrupted control is written again, not resumed
    _record_radius(run, lm, batch)
    run.save_config()
    vectors = random_vectors(n, lm.width, config.radius, source, seed)
    run.save_result(vectors, torch.zeros(n, 1))
    return run
