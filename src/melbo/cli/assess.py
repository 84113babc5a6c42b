"""`melbo assess`: learned against random perturbations, behaviour clusters, metrics.json."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.table import Table

from melbo.cli.app import (
    BlocksOpt, DeviceOpt, DtypeOpt, ModelOpt, ThreadsOpt, app, err, load, out, recorded_system, shown,
)
from melbo.errors import MelboError
from melbo.settings import CONSISTENT_SHARE, DEFAULT_RANDOM


@app.command("assess")
def assess(
    run_dir: Path = typer.Argument(..., help="A run directory written by `melbo discover`."),
    random: int = typer.Option(DEFAULT_RANDOM, help="Compare with K random vectors of the run's radius (0: skip)."),
    seed: int = typer.Option(0, help="Seed of the random vectors."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Score a run against random vectors of its radius, group its vectors into behaviours, write metrics.json."""
    from melbo.judging.assess import METRICS, assess_run
    from melbo.engine.store import Run

    run = Run.load(run_dir)
    if run.perturbations is None:
        raise MelboError(f"run {run_dir} is not finished: resume it with `melbo discover --resume {run_dir}`")
    if random < 0:
        raise MelboError(f"--random must be ≥ 0, got {random}")
    # the run's metrics are about the prompts it was made with: its own system prompt, never another
    lm = load(model or run.config.model.spec, device, dtype, blocks_path, threads,
              recorded_system(None, run.config.model))
    run.attach(lm)
    with err.status("generating and scoring …"):
        metrics = assess_run(run, lm, random=random, seed=seed)
    table = Table(header_style="bold", title=f"R = {run.config.radius_relative:.3g}x residual norm")
    for col in ("perturbations", "n", "diversity", "distance from unsteered", "median perplexity", "repetition"):
        table.add_column(col, justify="left" if col == "perturbations" else "right")

    def cell(value) -> str:
        return "–" if value is None else f"{value:.3g}"

    for name, scores in (("learned", metrics["learned"]), (f"random (seed {seed})", metrics["random"])):
        if scores is None:
            continue
        n = sum(1 for p in scores["perturbations"] if p["vector"] is not None)
        table.add_row(name, str(n), cell(scores["diversity"]), cell(scores["mean_distance_from_unsteered"]),
                      cell(scores["median_perplexity"]), cell(scores["mean_repetition"]))
    out.print(table)
    if metrics["random"] is None and random:
        out.print("random baseline skipped: this run holds adapters, not vectors")
    groups = Table(header_style="bold", title="behaviours")
    for col in ("cluster", "name", "members"):
        groups.add_column(col)
    for c in metrics["clusters"]:
        groups.add_row(str(c["id"]), shown(c["name"]), shown(", ".join(c["members"])))
    out.print(groups)
    out.print(f"written to [bold]{run.path / METRICS}[/]")


@app.command("check")
def check_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory (discover or diff)."),
    check: str = typer.Option("arithmetic-cot", "--check", help="The checker: arithmetic-cot, or module:function returning a melbo.judging.checkers.Verdict."),
    consistent: float = typer.Option(CONSISTENT_SHARE, help="Share of a perturbation's completions that must show a pattern for it to count."),
) -> None:
    """Read every completion of a run with a checker (learned and random): which error patterns do perturbations
    show consistently, against random vectors of the same norm? Writes checks.json; no model needed."""
    from melbo.judging.checkers import check_run
    from melbo.cli.tables import print_checks
    from melbo.records.report import write_report

    check_run(run_dir, check, consistent_share=consistent)
    print_checks(run_dir)
    write_report(Path(run_dir))  # with its Checker section
