"""docs/architecture.md's layer table holds against the code: no import runs up a layer, no new import cycle.

Every import counts, module-level or inside a function: a function-level import hides a dependency from the
reader, not from the architecture.
"""

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "src" / "melbo"
# Modules that still import each other (docs/architecture.md would say why, and how to end it): none.
KNOWN_CYCLES: list[set[str]] = []


def layers() -> dict[str, int]:
    """module (or package) → its layer, from the table's rows `| N | `a` `b` ... | ... |`."""
    text = (ROOT / "docs" / "architecture.md").read_text()
    placed = {}
    for number, modules in re.findall(r"^\| (\d) \| ([^|]+) \|", text, flags=re.MULTILINE):
        for name in re.findall(r"`([\w.]+)`", modules):
            placed["melbo." + name] = int(number)
    return placed


def modules() -> dict[str, Path]:
    found = {}
    for path in PACKAGE.rglob("*.py"):
        name = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts)
        found[name.removesuffix(".__init__")] = path
    return found


def imports(path: Path, known: dict[str, Path]) -> set[str]:
    """The melbo modules `path` imports anywhere in it (`from melbo.x import y` names module melbo.x.y if it is one)."""
    named = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            named |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            named |= {f"{node.module}.{a.name}" if f"{node.module}.{a.name}" in known else node.module
                      for a in node.names}
    return {_owner(n, known) for n in named if n.startswith("melbo.")} - {None}


def _owner(name: str, known) -> str | None:
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def layer_of(module: str, placed: dict[str, int]) -> int | None:
    while module and module not in placed:
        module = module.rpartition(".")[0]
    return placed.get(module)


def graph() -> dict[str, set[str]]:
    known = modules()
    return {name: imports(path, known) - {name, "melbo"} for name, path in known.items() if name != "melbo"}


def test_every_module_has_a_layer():
    placed = layers()
    assert len(set(placed.values())) == 9, "the table lists layers 0 to 8"
    assert [m for m in graph() if layer_of(m, placed) is None] == []


def test_no_import_runs_up_a_layer():
    placed = layers()
    upward = [f"{m} (layer {layer_of(m, placed)}) imports {t} (layer {layer_of(t, placed)})"
              for m, targets in graph().items() for t in sorted(targets)
              if layer_of(t, placed) > layer_of(m, placed)]
    assert upward == []


def test_no_import_cycles_but_the_known_ones():
    edges = graph()
    cycles = [c for c in _strongly_connected(edges) if len(c) > 1]
    assert sorted(map(sorted, cycles)) == sorted(map(sorted, KNOWN_CYCLES))


def _strongly_connected(edges: dict[str, set[str]]) -> list[set[str]]:
    """Tarjan's algorithm (recursive: a few dozen modules)."""
    index, low, on_stack, stack, found = {}, {}, set(), [], []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in edges.get(v, ()):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = set()
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.add(w)
                if w == v:
                    break
            found.append(component)

    for v in sorted(edges):
        if v not in index:
            visit(v)
    return found
