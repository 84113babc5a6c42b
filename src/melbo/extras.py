"""Optional dependencies: `melbo serve` needs the `serve` extra, `--workers`/`--ray-address` the `ray` extra.

The core install (discover, diff, audit, triggers, export) does without them; a command that needs one says in one
line which `pip install` adds it, instead of an ImportError traceback.
"""

from __future__ import annotations

import importlib
from types import ModuleType

from melbo.errors import MelboError

EXTRAS = {  # module → (extra, what needs it)
    "fastapi": ("serve", "melbo serve"),
    "uvicorn": ("serve", "melbo serve"),
    "python_multipart": ("serve", "melbo serve"),
    "ray": ("ray", "--workers and --ray-address"),
}


def require(module: str) -> ModuleType:
    """Import an optional dependency, or fail in one line naming the extra that installs it."""
    try:
        return importlib.import_module(module)
    except ImportError:
        extra, what = EXTRAS[module]
        raise MelboError(f"{what} needs {module}, which is not installed: pip install 'melbo[{extra}]'") from None
