"""What every benchmark shares: the `Bench` interface and registry, a result written as `bench.json` (with its
rates and their intervals), printed with rich, repeats over seeds, and pattern detectors.

A bench is an object with a `name`, a `title`, the settings class it takes (`melbo.bench.settings`) and
`run(lm, out, settings, progress, on_batch) -> BenchResult`; `get_bench(name)` finds it (arithmetic, refusal,
backdoor, diff, monitor). `run_seeds` repeats one over K discovery seeds and aggregates.

    bench.json = {"bench": name, "title": str, "settings": {...},
                  "tables": [{"title": str, "columns": [str], "rows": [[cells]]}],
                  "notes": [str], "wall_seconds": float}

Cells are strings, numbers, booleans or null. Every rate a bench reports is also a row of its "rates" table
(`add_rate`: hits, n, rate and its 95% Wilson interval as separate numeric columns), and every steered-vs-unsteered
comparison on the same items a row of its "paired" table (`add_paired`: the discordant counts, the difference with
a paired bootstrap interval and the exact McNemar p); `melbo.stats` computes them. `melbo report` shows the tables of a run directory's bench.json in
a "Benchmark" section.
"""

from __future__ import annotations

import re
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from importlib import import_module
from typing import Any, Callable, Iterable, Optional, Protocol, Sequence

from melbo.checks import check_count_bound
from melbo.errors import MelboError
from melbo.numbers import finite_or_none, format_cell
from melbo.files import read_json, write_json
from melbo.jsonfields import Fields
from melbo.stats import CONFIDENCE, Estimate, bootstrap_difference, bootstrap_mean, mcnemar, wilson
from melbo.store import BENCH

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


def rate(hits: int, total: int) -> Optional[float]:
    return hits / total if total else None


# ------------------------------------------------------------------------------------------------ the interface
Progress = Optional[Callable[[dict], None]]
OnBatch = Optional[Callable[[int], None]]


class Bench(Protocol):
    """One benchmark: trains (or loads) perturbations, measures them against a control, writes bench.json."""

    name: str
    title: str
    settings: type  # its settings class (melbo.bench.settings)

    def run(self, lm, out: str | Path, settings, progress: Progress = None, on_batch: OnBatch = None) -> BenchResult:
        ...

    def generations(self, settings) -> int:
        """Completions the bench generates (the size of the command line's generation bar)."""
        ...


# name → the module that defines it as BENCHMARK (imported on use: the benches import torch)
_REGISTRY = {"arithmetic": "melbo.bench.arithmetic", "refusal": "melbo.bench.refusal",
             "backdoor": "melbo.bench.backdoor", "diff": "melbo.bench.diff", "monitor": "melbo.bench.monitor",
             "audit": "melbo.bench.audit", "triggers": "melbo.bench.triggers",
             "subtle": "melbo.bench.subtle"}


def bench_names() -> list[str]:
    return list(_REGISTRY)


def get_bench(name: str) -> Bench:
    if name not in _REGISTRY:
        raise MelboError(f"unknown bench {name!r}: use one of {', '.join(_REGISTRY)}")
    return import_module(_REGISTRY[name]).BENCHMARK


def keyword_settings(cls: type, settings: dict):
    """A settings record from keywords: the class's fields as given, any other keyword a discovery setting
    (n_vectors, p, positions, lr, …: `BenchSettings.build`); `prompt` is a one-prompt `prompts`."""
    from dataclasses import fields

    settings = dict(settings)
    if "prompt" in settings and "prompt" not in {f.name for f in fields(cls)}:
        one = settings.pop("prompt")
        if one is not None:
            settings["prompts"] = [one]
    return cls.build(**settings)


def check_seeds(seeds: int) -> None:
    if isinstance(seeds, bool) or not isinstance(seeds, int) or seeds < 1:
        raise MelboError(f"--seeds must be a whole number ≥ 1, got {seeds!r}")
    check_count_bound("seeds", seeds)


def run_seeds(bench: Bench, lm, out: str | Path, settings, seeds: int = 1, progress: Progress = None,
              on_batch: OnBatch = None) -> BenchResult:
    """`bench` over `seeds` consecutive discovery seeds from settings.seed.

    One seed runs straight into `out`. Several run into `out/seed-<s>/` each, and `out/bench.json` aggregates
    them: every rate of the runs' "rates" tables as its mean over seeds with a bootstrap interval over seeds.
    """
    check_seeds(seeds)
    if seeds == 1:
        return bench.run(lm, out, settings, progress, on_batch)
    from melbo.files import make_output_dir

    started = time.perf_counter()
    out = Path(out)
    make_output_dir(out)
    results = [bench.run(lm, out / f"seed-{s}", settings.with_seed(s), progress, on_batch)
               for s in range(settings.seed, settings.seed + seeds)]
    result = aggregate(results, [settings.seed + k for k in range(seeds)])
    result.settings["runs"] = [str(out / f"seed-{settings.seed + k}") for k in range(seeds)]
    result.wall_seconds = time.perf_counter() - started
    result.write(out)
    return result


def aggregate(results: Sequence[BenchResult], seeds: Sequence[int]) -> BenchResult:
    """One result over several seeds' results of the same bench: each rate's mean and interval over seeds."""
    first = results[0]
    settings = {k: v for k, v in first.settings.items() if k not in ("seed", "run")}
    result = BenchResult(first.bench, f"{first.title} ({len(results)} seeds)", {**settings, "seeds": list(seeds)})
    table = result.table(SEEDS, SEED_COLUMNS)
    per_seed = [r.rates() for r in results]
    for key in first.rates():
        values = [rates.get(key) for rates in per_seed]
        present = [v for v in values if v is not None]
        e = bootstrap_mean(present, seed=0)
        table.add(*key, len(present), e.value, e.low, e.high, ", ".join("—" if v is None else f"{v:.2f}" for v in values))
    for r, s in zip(results, seeds):
        result.notes += [f"seed {s}: {note}" for note in r.notes]
    return result


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
    from melbo.files import atomic_write, json_line

    atomic_write(path, "".join(json_line(r) + "\n" for r in rows).encode())
