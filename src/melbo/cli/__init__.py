"""The `melbo` command line (entry point `melbo.cli:main`): `melbo.cli.app` and one module per command group."""

from melbo.cli import assess, audit, bench, catalog, chat, discover, export, generate, models, report, serve, sweep  # noqa: F401
from melbo.cli.app import app, main

__all__ = ["app", "main"]
