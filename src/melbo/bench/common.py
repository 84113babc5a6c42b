"""What every benchmark shares: a result written as `bench.json`, printed with rich, and pattern detectors.

    bench.json = {"bench": name, "title": str, "settings": {...},
                  "tables": [{"title": str, "columns": [str], "rows": [[cells]]}],
                  "notes": [str], "wall_seconds": float}

Cells are strings, numbers, booleans or null. `melbo report` shows the tables of a run directory's bench.json in
a "Benchmark" section.
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterable, Optional, Sequence

from melbo.errors import MelboError
from melbo.numbers import finite_or_none, format_cell
from melbo.files import read_json, write_json
from melbo.store import BENCH



@dataclass
class BenchTable:
    title: str
    columns: list[str]
    rows: list[list[Any]] = field(default_factory=list)

    def add(self, *cells: Any) -> None:
        if len(cells) != len(self.columns):
            raise ValueError(f"row of {len(cells)} cells for {len(self.columns)} columns in table {self.title!r}")
        self.rows.append([_cell(c) for c in cells])


@dataclass
class BenchResult:
    bench: str
    title: str
    settings: dict = field(default_factory=dict)
    tables: list[BenchTable] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    wall_seconds: float = 0.0

    def table(self, title: str, columns: Sequence[str]) -> BenchTable:
        """Append an empty table and return it (fill it with `.add(...)`)."""
        t = BenchTable(title, list(columns))
        self.tables.append(t)
        return t

    def to_json(self) -> dict:
        return asdict(self)

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / BENCH
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BenchResult":
        path = Path(path)
        doc = read_json(path / BENCH if path.is_dir() else path)
        try:
            tables = [BenchTable(str(t["title"]), [str(c) for c in t["columns"]], [list(r) for r in t["rows"]])
                      for t in doc.get("tables", [])]
            return cls(str(doc["bench"]), str(doc.get("title", doc["bench"])), dict(doc.get("settings", {})), tables,
                       [str(n) for n in doc.get("notes", [])], float(doc.get("wall_seconds", 0.0)))
        except (KeyError, TypeError, ValueError) as exc:
            raise MelboError(f"{path} is not a melbo bench.json ({exc}): re-run the benchmark") from exc


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return finite_or_none(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _cell(value.item())
    return str(value)


def rate(hits: int, total: int) -> Optional[float]:
    return hits / total if total else None


def print_result(result: BenchResult, console=None) -> None:
    """The tables and notes of a result, printed with rich (model text escaped)."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    console = console or Console(stderr=True)  # the library never writes to stdout; the CLI passes its console
    for t in result.tables:
        table = Table(title=escape(t.title), header_style="bold", title_justify="left")
        for col in t.columns:
            table.add_column(escape(col), overflow="fold")
        for row in t.rows:
            table.add_row(*(escape(format_cell(c)) for c in row))
        console.print(table)
    for note in result.notes:
        console.print(escape(note), highlight=False, soft_wrap=True)
    console.print(f"{escape(result.title)}: {result.wall_seconds:.0f} s", highlight=False)


# ------------------------------------------------------------------------------------------------ detectors
def compile_patterns(patterns: Iterable[str], flags: int = re.IGNORECASE) -> list[re.Pattern]:
    return [re.compile(p, flags) for p in patterns]


def first_match(text: str, patterns: Sequence[re.Pattern]) -> Optional[str]:
    """The text the first matching pattern matched, or None."""
    for p in patterns:
        m = p.search(text)
        if m:
            return m.group(0)
    return None


def matches(text: str, patterns: Sequence[re.Pattern]) -> bool:
    return first_match(text, patterns) is not None


def normalise_quotes(text: str) -> str:
    return text.replace("\u2019", "'").replace("\u2018", "'").replace("\u201c", '"').replace("\u201d", '"')


def short(text: str, width: int = 80) -> str:
    """One line of at most `width` characters."""
    line = " ".join(text.split())
    return line if len(line) <= width else line[: width - 1] + "…"


def write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    from melbo.files import atomic_write

    atomic_write(path, "".join(json.dumps(r) + "\n" for r in rows).encode())
