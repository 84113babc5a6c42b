"""The `melbo` command line (entry point `melbo.cli:main`): `melbo.cli.app` and one module per command group."""

from melbo.cli import assess, audit, bench, catalog, chat, discover, export, generate, map, models, report, serve, sweep  # noqa: F401,A004
from melbo.cli.app import app, main

__all__ = ["app", "main"]
