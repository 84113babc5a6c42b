"""docs/architecture.md's layer table and package order hold against the code: no import runs up a layer or to a
package below, no import cycle.

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
    """Every module's melbo imports; a package whose __init__ is only its docstring (melbo.io, melbo.engine, ...)
    is a folder, not a module, and is left out."""
    known = modules()
    return {name: imports(path, known) - {name, "melbo"} for name, path in known.items()
            if name != "melbo" and not _only_a_docstring(path)}


def _only_a_docstring(path: Path) -> bool:
    body = ast.parse(path.read_text()).body
    return path.name == "__init__.py" and len(body) == 1 and isinstance(body[0], ast.Expr)


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


def package_order() -> list[str]:
    """The packages of the "Packages" table, top to bottom ("" is melbo's top level; bench, cli, server share a row)."""
    text = (ROOT / "docs" / "architecture.md").read_text().split("## Packages", 1)[1]
    rows = re.findall(r"^\| (`melbo/[^|]+) \|", text, flags=re.MULTILINE)
    return [" ".join(sorted(re.findall(r"`melbo/(\w*)/?`", row))) for row in rows]


def package_of(module: str, order: list[str]) -> str:
    name = module.split(".")[1] if module.count(".") else ""
    return next((row for row in order if name in row.split()), "")


def test_layout_matches_the_package_table():
    order = package_order()
    assert order[:6] == ["", "io", "engine", "judging", "records", "jobs"], order
    on_disk = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert on_disk == {name for row in order for name in row.split()} - {""}


def test_no_import_reaches_a_package_below():
    order = package_order()
    rank = {row: i for i, row in enumerate(order)}
    downward = [f"{m} ({package_of(m, order) or 'top level'}) imports {t} ({package_of(t, order) or 'top level'})"
                for m, targets in graph().items() for t in sorted(targets)
                if rank[package_of(t, order)] > rank[package_of(m, order)]]
    assert downward == []


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
