"""bench.json, typed: a benchmark's result, its tables of rates (with their intervals) and paired comparisons
(melbo.bench writes it; the report and the catalogue read it).

    bench.json = {"bench": name, "title": str, "settings": {...},
                  "tables": [{"title": str, "columns": [str], "rows": [[cells]]}],
                  "notes": [str], "wall_seconds": float}

Cells are strings, numbers, booleans or null.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from melbo.io.files import read_json, write_json
from melbo.io.jsonfields import Fields
from melbo.numbers import finite_or_none
from melbo.stats import CONFIDENCE, Estimate, bootstrap_difference, mcnemar, wilson

BENCH = "bench.json"  # in a benchmark's directory
RATES = f"rates with {CONFIDENCE:.0%} intervals (Wilson)"
RATE_COLUMNS = ["arm", "measure", "hits", "n", "rate", "low", "high"]
PAIRED = "paired comparisons on the same items (exact McNemar; difference with a paired bootstrap interval)"
PAIRED_COLUMNS = ["first", "second", "measure", "n", "both", "only first", "only second", "neither",
                  "difference", "low", "high", "McNemar p"]
SEEDS = f"over discovery seeds: mean of each rate, {CONFIDENCE:.0%} bootstrap interval over seeds"
SEED_COLUMNS = ["arm", "measure", "seeds", "mean", "low", "high", "per seed"]


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

    def find(self, title: str) -> Optional[BenchTable]:
        return next((t for t in self.tables if t.title == title), None)

    def add_rate(self, arm: str, measure: str, hits: int, n: int) -> Estimate:
        """A rate (hits of n) with its Wilson interval, as a row of the "rates" table; returns the estimate."""
        table = self.find(RATES) or self.table(RATES, RATE_COLUMNS)
        e = wilson(int(hits), int(n))
        table.add(arm, measure, int(hits), int(n), e.value, e.low, e.high)
        return e

    def add_paired(self, first: str, second: str, measure: str, x: Sequence[bool], y: Sequence[bool],
                   seed: int = 0) -> None:
        """Two arms' binary outcomes on the same items: counts, difference (x − y) with interval, McNemar p."""
        table = self.find(PAIRED) or self.table(PAIRED, PAIRED_COLUMNS)
        t = mcnemar(x, y)
        d = bootstrap_difference([float(v) for v in x], [float(v) for v in y], seed=seed)
        table.add(first, second, measure, t.n, t.both, t.only_x, t.only_y, t.neither, d.value, d.low, d.high,
                  t.p_value)

    def rates(self) -> dict[tuple[str, str], Optional[float]]:
        """(arm, measure) → rate, from the "rates" table."""
        table = self.find(RATES)
        return {(row[0], row[1]): row[4] for row in table.rows} if table else {}

    def write(self, run_dir: str | Path) -> Path:
        path = Path(run_dir) / BENCH
        write_json(path, self.to_json())
        return path

    @classmethod
    def load(cls, path: str | Path) -> "BenchResult":
        """bench.json (of a directory, or the file), every field checked: cells are text, numbers, yes/no or null."""
        path = Path(path)
        file = path / BENCH if path.is_dir() else path
        return cls.from_dict(read_json(file), file)

    @classmethod
    def from_dict(cls, raw: object, file: Path | str = BENCH) -> "BenchResult":
        f = Fields(raw, file, "re-run the benchmark")
        tables = []
        for t in f.objects("tables", []):
            columns = t.texts("columns")
            rows = [_checked_row(t, f"rows[{i}]", row, len(columns)) for i, row in enumerate(t.items("rows", []))]
            tables.append(BenchTable(t.text("title"), columns, rows))
        bench = f.text("bench")
        return cls(bench, f.text("title", bench), f.mapping("settings", None) or {}, tables, f.texts("notes", []),
                   f.real("wall_seconds", 0, default=0.0))


def _checked_row(table: Fields, name: str, row: Any, width: int) -> list[Any]:
    if not isinstance(row, list) or len(row) != width:
        raise table.error(f"{table.where}.{name}", f"is not a list of {width} cells")
    for cell in row:
        if isinstance(cell, float):
            table.check_real(f"{table.where}.{name}", cell)  # NaN and ±inf: strict JSON writes null
        elif cell is not None and not isinstance(cell, (str, bool, int)):
            raise table.error(f"{table.where}.{name}", f"holds {type(cell).__name__}, not a cell")
    return row


def _cell(value: Any) -> Any:
    if value is None or isinstance(value, (str, bool, int)):
        return value
    if isinstance(value, float):
        return finite_or_none(value)
    if hasattr(value, "item"):  # numpy / torch scalars
        return _cell(value.item())
    return str(value)
