"""`melbo map`: every (source, target) pair's top Jacobian directions (`melbo.map`); `melbo open-pair` opens one."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from melbo.cli.app import (
    BlocksOpt, ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, PositionsOpt, PromptsFileOpt, SeedOpt, SystemPromptOpt,
    ThreadsOpt, app, err, load, out, parse_positions, read_prompts, shown)
from melbo.errors import MelboError
from melbo.settings import MAP_ITERATIONS, MAP_K, MAP_RADIUS

WorkersOpt = typer.Option(None, "--workers", help="Run on N Ray workers (default: serially here, or every CPU of "
                                                    "--ray-address's cluster).")
RayAddressOpt = typer.Option(None, "--ray-address", help="Join a running Ray cluster (host:port); default: local Ray.")
BEST = 10  # pairs printed


@app.command("map")
def map_command(
    prompts: List[str] = typer.Argument(None, help="Prompts the Jacobians are taken on."),
    prompts_file: Optional[Path] = PromptsFileOpt,
    sources: Optional[str] = typer.Option(None, help="Source blocks: 4:20 (both ends included), 4:20:2, 3,7,11 or all."),
    targets: Optional[str] = typer.Option(None, help="Target blocks, as --sources."),
    layers: Optional[str] = typer.Option(None, help="Sources and targets both (e.g. all). Default: 8 evenly spaced blocks."),
    k: int = typer.Option(MAP_K, "--directions", "-k", help="Directions per pair."),
    iterations: int = typer.Option(MAP_ITERATIONS, help="Power iterations per pair."),
    seed: int = SeedOpt,
    chat: Optional[bool] = ChatOpt,
    positions: str = PositionsOpt,
    workers: Optional[int] = WorkersOpt,
    ray_address: Optional[str] = RayAddressOpt,
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Map directory (default: runs/map-<time>)."),
    resume_dir: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted map directory (its prompts and settings again, as discover --resume)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Map the top-k Jacobian singular values of every (source, target) block pair; rank the pairs; draw a heatmap."""
    import datetime as _dt

    import melbo
    from melbo.engine.distributed import check_request
    from melbo.io.files import check_output_dir

    texts = read_prompts(prompts or [], prompts_file)
    if layers is not None and (sources is not None or targets is not None):
        raise MelboError("give either --layers or --sources/--targets, not both")
    if resume_dir is not None and out_dir is not None and Path(out_dir) != Path(resume_dir):
        raise MelboError("--resume DIR continues the map in DIR: drop --out, or give the same directory")
    resume = resume_dir is not None
    from melbo.engine.store import LAYER_MAP

    if resume and not (Path(resume_dir) / LAYER_MAP).is_file():
        raise MelboError(f"{resume_dir} holds no map to resume (no {LAYER_MAP}): give the directory a map wrote, "
                         "or start one with --out")
    out_dir = resume_dir if resume else out_dir
    chosen_sources, chosen_targets = (layers, layers) if layers is not None else (sources, targets)
    for what, spec in (("sources", chosen_sources), ("targets", chosen_targets)):
        _check_syntax(what, spec)
    check_request(workers, ray_address)  # before loading: an unreachable cluster fails in seconds
    path = out_dir or Path("runs") / f"map-{_dt.datetime.now():%Y%m%d-%H%M%S}"
    check_output_dir(path)
    lm = load(model, device, dtype, blocks_path, threads, system_prompt)
    bar = Progress(TextColumn("[bold]pairs"), BarColumn(), TextColumn("{task.completed}/{task.total}"),
                   TextColumn("{task.fields[last]}"), TimeElapsedColumn(), console=err)
    task = bar.add_task("pairs", total=None, last="")

    def update(event: dict) -> None:
        if event["stage"] == "start":
            bar.update(task, total=event["total"], completed=event["done"])
        else:
            by = f" on worker {event['worker']}" if event.get("worker") else ""
            bar.update(task, completed=event["done"],
                       last=f"{event['source']}→{event['target']} {event['seconds']:.1f} s{by}")

    with bar:
        try:
            result = melbo.map(lm, texts, chosen_sources, chosen_targets, k, path, iterations=iterations, seed=seed,
                               chat=chat, positions=parse_positions(positions), resume=resume, workers=workers,
                               ray_address=ray_address, progress=update)
        except KeyboardInterrupt:
            err.print(f"interrupted: finished pairs are kept; continue with `melbo map ... --resume {path}`")
            raise typer.Exit(130) from None
    table = Table(header_style="bold", title=f"best pairs of {len(result.ranking())}")
    for col in ("rank", "source → target", "relative gain", "σ₁", "σ₂…"):
        table.add_column(col, justify="right")
    for r in result.ranking()[:BEST]:
        sigma = r["singular_values"]
        table.add_row(str(r["rank"]), f"{r['source']} → {r['target']}", f"{r['gain']:.3g}", f"{sigma[0]:.3g}",
                      ", ".join(f"{v:.3g}" for v in sigma[1:]))
    out.print(table)
    out.print(f"heatmap: [bold]{shown(str(result.heatmap))}[/]", highlight=False)
    out.print(f"report: [bold]{shown(str(path / 'report.html'))}[/]", highlight=False)
    best = result.ranking()[0]
    out.print(f"open a pair as a run: melbo open-pair {shown(str(path))} {best['source']}:{best['target']} "
              f"--out runs/pair-{best['source']}-{best['target']}", highlight=False, soft_wrap=True)


def _check_syntax(what: str, spec: Optional[str]) -> None:
    """Malformed ranges fail before the model loads (their bounds are checked once the depth is known)."""
    from melbo.jobs.layermap import parse_layers

    if spec is not None and spec.strip().lower() != "all":
        try:
            parse_layers(spec, 1 << 20, what)
        except MelboError as exc:
            if "out of range" not in str(exc):
                raise


@app.command("open-pair")
def open_pair_command(
    map_dir: Path = typer.Argument(..., help="A map directory written by `melbo map`."),
    pair: str = typer.Argument(..., help="source:target, e.g. 6:20."),
    out_dir: Path = typer.Option(..., "--out", "-o", help="Run directory to write."),
    radius: str = typer.Option(MAP_RADIUS, help="Vector norm: absolute (4.0) or relative to the source's residual norm (0.2x)."),
) -> None:
    """Write one mapped pair's directions as an ordinary run (for generate, chat, export)."""
    import melbo

    try:
        source, target = (int(x) for x in pair.split(":"))
    except ValueError:
        raise MelboError(f"pair {pair!r} is not source:target: use e.g. 6:20") from None
    run = melbo.open_pair(map_dir, source, target, out_dir, radius=radius)
    out.print(f"wrote [bold]{shown(str(run.path))}[/]: {len(run)} directions at R = {run.config.radius:.4g}; "
              f"try `melbo generate {shown(str(run.path))} -p \"...\"`", highlight=False, soft_wrap=True)
