"""`melbo sweep`: the Goldilocks radius."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from melbo.cli.app import (
    BlocksOpt, DeviceOpt, DtypeOpt, ModelOpt, SystemPromptOpt, ThreadsOpt, app, err, load, out, read_prompts, shown,
)
from melbo.cli.map import RayAddressOpt, WorkersOpt
from melbo.errors import MelboError
from melbo.settings import FLUENCY_FACTOR, SWEEP_RADII, SWEEP_STEPS, SWEEP_TOKENS, SWEEP_VECTORS


@app.command("sweep")
def sweep_command(
    prompts: List[str] = typer.Argument(None, help="Prompts to train on."),
    prompts_file: Optional[Path] = typer.Option(None, help="File with one prompt per line."),
    radii: str = typer.Option(",".join(SWEEP_RADII), help="Comma-separated radii, all relative (0.1x) or all absolute."),
    layers: Optional[str] = typer.Option(None, "--pairs", help="Also sweep source:target pairs, e.g. 6:20,8:22 (map's --layers is a block range)."),
    n_vectors: int = typer.Option(SWEEP_VECTORS, "--n-vectors", "-n", help="Vectors per point."),
    steps: int = typer.Option(SWEEP_STEPS, help="Optimiser steps per point."),
    source: Optional[int] = typer.Option(None, help="Source block (without --pairs)."),
    target: Optional[int] = typer.Option(None, help="Target block (without --pairs)."),
    max_new_tokens: int = typer.Option(SWEEP_TOKENS, help="Tokens to generate per completion."),
    fluency_factor: float = typer.Option(FLUENCY_FACTOR, help="Fluent: median perplexity ≤ this × the unsteered one's."),
    fluency_floor: Optional[float] = typer.Option(None, help="Absolute perplexity floor (overrides --fluency-factor)."),
    chat: Optional[bool] = typer.Option(None, "--chat/--raw", help="Use the chat template (default: if the model has one)."),
    seed: int = typer.Option(0),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Sweep directory (default: runs/sweep-<time>)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    workers: Optional[int] = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Find the Goldilocks radius: train a few vectors per R, pick the most diverse R that stays fluent."""
    import datetime as _dt

    from melbo.jobs import sweep as sweeping

    texts = read_prompts(prompts or [], prompts_file)
    specs, relative = sweeping.parse_radii(radii)
    pairs = sweeping.parse_layer_pairs(layers)
    sweeping.check_floor(fluency_factor, fluency_floor)
    if pairs and (source is not None or target is not None):
        raise MelboError("give either --pairs or --source/--target, not both")
    path = out_dir or Path("runs") / f"sweep-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    from melbo.io.files import check_output_dir

    check_output_dir(path)  # before the progress display, which would wrap the one-line error
    from melbo.engine.distributed import check_request

    check_request(workers, ray_address)  # before loading: an unreachable cluster fails in seconds
    lm = load(model, device, dtype, blocks_path, threads, system_prompt)
    n_points = len(specs) * (len(pairs) if pairs else 1)
    bar = Progress(TextColumn("[bold]{task.description}"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[stage]}"), TimeElapsedColumn(), console=err)
    overall = bar.add_task("points", total=n_points, stage="")
    steps_task = bar.add_task("steps", total=steps, stage="")
    state = {"point": -1}

    def update(event: dict) -> None:
        where = f"R = {event['radius']}" + (f", layers {event['source']}:{event['target']}" if pairs else "")
        if event["point"] != state["point"]:
            state["point"] = event["point"]
            bar.update(overall, completed=event["point"])
            bar.reset(steps_task, total=steps)
        if "step" in event:
            bar.update(steps_task, completed=event["step"], stage=f"{where}: training")
        else:
            bar.update(overall, stage=f"{where}: {event['stage']}")
            if event["stage"] == "score":
                bar.update(steps_task, completed=steps)

    with bar:
        try:
            result = sweeping.sweep(
                lm, texts, specs, n_vectors=n_vectors, steps=steps, source=source, target=target, layer_pairs=pairs,
                max_new_tokens=max_new_tokens, out=path, progress=update, fluency_factor=fluency_factor,
                fluency_floor=fluency_floor, chat=chat, seed=seed, workers=workers, ray_address=ray_address)
        except KeyboardInterrupt:
            err.print(f"interrupted: finished points are kept; run the same command with --out {path} to continue")
            raise typer.Exit(130) from None
        bar.update(overall, completed=n_points, stage="done")
    table = Table(header_style="bold", title=f"radius sweep (fluency floor {result['fluency_floor']:.3g})")
    columns = ["R", "R (× norm)"] + (["layers"] if pairs else []) + [
        "diversity", "median perplexity", "distance from unsteered", "repetition", "fluent", ""]
    for col in columns:
        table.add_column(col, justify="right")

    def cell(value) -> str:
        return "–" if value is None else f"{value:.3g}"

    chosen = result["chosen"]
    for p in result["points"]:
        picked = chosen is not None and all(chosen[k] == p[k] for k in ("radius", "source", "target"))
        row = [f"{p['radius']:.4g}", f"{p['radius_relative']:.3g}x"] + (
            [f"{p['source']}:{p['target']}"] if pairs else []) + [
            cell(p["diversity"]), cell(p["median_perplexity"]), cell(p["mean_distance_from_unsteered"]),
            cell(p["mean_repetition"]), "yes" if p["fluent"] else "no", "[bold green]← chosen[/]" if picked else ""]
        table.add_row(*row)
    out.print(table)
    out.print(shown(result["reason"]), highlight=False, soft_wrap=True)
    out.print(f"written to [bold]{path / sweeping.SWEEP}[/] and [bold]{path / sweeping.PLOT}[/]")
