"""`melbo export`: llama.cpp control vectors or PEFT LoRA adapters."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from melbo.cli.app import BlocksOpt, DeviceOpt, DtypeOpt, ModelOpt, app, load, out, parse_indices
from melbo.errors import MelboError


@app.command("export")
def export(
    run_dir: Path = typer.Argument(..., help="A run directory written by `melbo discover`."),
    fmt: str = typer.Option(..., "--format", "-f", help="llamacpp (steering vectors) or peft (steering adapters)."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Directory to write the exported files into."),
    vectors: Optional[str] = typer.Option(None, help="Comma-separated vector indices (default: all)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
) -> None:
    """Export a run's perturbations: llama.cpp control vectors (GGUF) or PEFT LoRA adapters."""
    from melbo.records import export as exporting
    from melbo.io.files import check_output_dir
    from melbo.engine.store import Run

    check_output_dir(out_dir)
    run = Run.load(run_dir)
    if run.perturbations is None:
        raise MelboError(f"run {run_dir} is not finished: complete it with `melbo discover --resume {run_dir}`")
    kind = fmt.strip().lower()
    indices = parse_indices(vectors)
    formats = run.perturbations.export_formats
    if kind == "llamacpp":
        if "gguf" not in formats:
            raise MelboError(f"run {run_dir} holds {run.perturbations.KIND}, which llama.cpp cannot load: "
                             "use --format peft")
        hint, depth = _llamacpp_model(run, model)
        paths = exporting.export_llamacpp(run.perturbations, out_dir, hint, depth, indices)
    elif kind == "peft":
        if "peft" not in formats:
            raise MelboError(f"run {run_dir} holds {run.perturbations.KIND}, not adapters: use --format llamacpp")
        lm = load(model or run.config.model.spec, device, dtype, blocks_path)
        run.attach(lm)
        paths = exporting.export_peft(run.perturbations, lm, out_dir, indices)
    else:
        raise MelboError(f"unknown export format {fmt!r}: use --format llamacpp or --format peft")
    for path in paths:
        out.print(str(path), highlight=False, soft_wrap=True)


def _llamacpp_model(run, model: Optional[str]) -> tuple[str, int]:
    """The model hint and depth a control vector records, from the run's config (no model is loaded for them)."""
    info, config = run.config.model, run.path / "config.json"
    if model is not None and model not in (info.id, info.spec):  # not loaded, so it must be the run's own
        raise MelboError(f"run {run.path} was made with model {info.spec}, not {model}: "
                         "leave out --model (llama.cpp export reads the run's config)")
    hint, depth = info.architecture, info.depth  # typed and range-checked as the run loaded
    if hint is None or not hint.strip():
        raise MelboError(f"{config} records no model.architecture (got {hint!r}): restore it, e.g. \"llama\"")
    if depth is None:
        raise MelboError(f"{config} records no model.depth: restore it (the number of blocks)")
    return hint, depth
