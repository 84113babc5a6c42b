"""`melbo serve`: the catalogue in a browser, with live steered generation."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Optional

import typer

from melbo.cli.app import DeviceOpt, DtypeOpt, ModelOpt, app, err
from melbo.settings import SERVE_HOST, SERVE_PORT


@app.command()
def serve(
    catalog: Optional[Path] = typer.Option(None, help="Catalogue database (default: $MELBO_CATALOG or melbo's data dir)."),
    port: int = typer.Option(SERVE_PORT, help="TCP port."),
    host: str = typer.Option(SERVE_HOST, help="Address to listen on; anything but this machine needs --token."),
    token: Optional[str] = typer.Option(None, help="Required on every request (default: $MELBO_TOKEN)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
) -> None:
    """Browse runs and behaviours, try perturbations live, chat, label and export, in a local web app."""
    from melbo.extras import require

    for module in ("fastapi", "uvicorn", "python_multipart"):
        require(module)
    from melbo.server import serve as serving
    from melbo.server.serving import TOKEN_ENV

    token = token if token is not None else (os.environ.get(TOKEN_ENV) or None)
    serving(catalog, host=host, port=port, token=token, model_spec=model, device=device, dtype=dtype,
            on_ready=lambda url: err.print(f"melbo serve: open {url}  (Ctrl-C stops)", highlight=False,
                                           soft_wrap=True))
