"""`melbo report`: a run directory's self-contained report.html."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer

from melbo.cli.app import app, out


@app.command("report")
def report(
    run_dir: Path = typer.Argument(..., help="A run directory written by `melbo discover`."),
    sweep: Optional[Path] = typer.Option(None, "--sweep", help="An R-sweep directory (with sweep.json) to plot."),
    open_page: bool = typer.Option(False, "--open", help="Open the report in a web browser."),
) -> None:
    """Write report.html (self-contained: settings, completions, metrics, plots) into a run directory."""
    from melbo.records.report import write_report

    path = write_report(run_dir, sweep)
    out.print(str(path), highlight=False, soft_wrap=True)
    if open_page:
        import webbrowser

        webbrowser.open(path.resolve().as_uri())
