"""`melbo chat`: multi-turn chat with a steered model."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from melbo.cli.app import (
    DeviceOpt, DtypeOpt, ModelOpt, SystemPromptOpt, ThreadsOpt, app, err, load, out, recorded_system, shown,
)
from melbo.errors import MelboError


@app.command()
def chat(
    run_dir: Path = typer.Argument(..., help="A run directory written by `melbo discover`."),
    vector: Optional[int] = typer.Option(None, "--vectors", "--vector", help="Perturbation to activate (default: none; one: chat switches with /vector N)."),
    scale: float = typer.Option(1.0),
    turns: Optional[Path] = typer.Option(None, help="Non-interactive: read user turns (one per line) from this file."),
    max_new_tokens: int = typer.Option(128),
    temperature: float = typer.Option(0.0),
    seed: int = typer.Option(0),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Multi-turn chat with a steered model (/vector N, /scale X, /off, /reset, /quit)."""
    from melbo.engine.chat import HELP, ChatSession
    from melbo.checks import check_scale
    from melbo.engine.generation import Sampling
    from melbo.io.files import read_text
    from melbo.engine.store import Run

    run = Run.load(run_dir)
    if turns is not None and not turns.is_file():
        raise MelboError(f"turns file {turns} does not exist: check the path")
    lines = read_text(turns, "turns file").splitlines() if turns is not None else None
    check_scale(scale)
    lm = load(model or run.config.model.spec, device, dtype, None, threads,
              recorded_system(system_prompt, run.config.model))
    run.attach(lm)
    session = ChatSession(lm, run.perturbations, vector, scale,
                          Sampling(max_new_tokens=max_new_tokens, temperature=temperature, seed=seed))
    if lines is None:
        err.print(HELP)
    while True:
        if lines is not None:
            if not lines:
                break
            line = lines.pop(0)
            if not line.strip():
                continue
            out.print(f"[bold]user>[/] {shown(line)}", highlight=False)
        else:
            try:
                line = input("user> ")
            except EOFError:
                break
        if line.strip() in ("/quit", "/exit"):
            break
        try:
            if line.startswith("/"):
                out.print(shown(session.command(line)), highlight=False)
                continue
            reply = session.say(line)
        except MelboError as exc:
            if lines is not None:
                raise
            err.print(f"[red]{shown(str(exc))}[/]")
            continue
        tag = "assistant" if session.vector is None else f"assistant[v{session.vector}]"
        out.print(f"[bold]{shown(tag)}>[/] {shown(reply)}", highlight=False)
