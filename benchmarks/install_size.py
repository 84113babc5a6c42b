"""Disk size of melbo's core install and of each extra, from the distributions installed in this environment.

    .venv/bin/python benchmarks/install_size.py

Walks the dependency closure of melbo's core requirements (and of each extra on top) through the installed
packages' metadata, and sums the files each distribution's RECORD lists. Torch counts as the wheel this
environment has (the Makefile installs the CPU build).
"""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path


def _name(requirement: str) -> tuple[str, str]:
    """(distribution name, extras marker) of a requirement string; marker '' when unconditional."""
    head, _, marker = requirement.partition(";")
    name = re.split(r"[\s\[<>=!~(]", head.strip(), maxsplit=1)[0]
    return name.lower().replace("_", "-"), marker.strip()


def closure(roots: list[str]) -> set[str]:
    seen: set[str] = set()
    todo = list(roots)
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        seen.add(name)
        for req in dist.requires or []:
            dep, marker = _name(req)
            if "extra ==" not in marker and dep not in seen:
                todo.append(dep)
    return seen


def size(name: str) -> int:
    dist = metadata.distribution(name)
    total = 0
    for f in dist.files or []:
        path = Path(dist.locate_file(f))
        if path.is_file():
            total += path.stat().st_size
    return total


def requirements(extra: str | None) -> list[str]:
    reqs = metadata.distribution("melbo").requires or []
    chosen = []
    for req in reqs:
        name, marker = _name(req)
        if name == "melbo":
            continue
        if (extra is None and "extra ==" not in marker) or (extra and f'extra == "{extra}"' in marker):
            chosen.append(name)
    return chosen


def main() -> None:
    core = closure(requirements(None))
    mb = lambda names: sum(size(n) for n in names) / 2**20  # noqa: E731
    print("| install | distributions | size on disk |")
    print("|---|---|---|")
    print(f"| core (`pip install melbo`) | {len(core)} | {mb(core):.0f} MB |")
    for extra in ("serve", "ray"):
        added = closure(requirements(extra)) - core
        print(f"| + `[{extra}]` | +{len(added)} | +{mb(added):.0f} MB |")
    torch = closure(["torch"])
    print(f"\nof the core, torch and what it pulls: {mb(torch):.0f} MB")


if __name__ == "__main__":
    main()
