"""What every benchmark shares: the `Bench` interface and registry, a result written as `bench.json` (with its
rates and their intervals), printed with rich, repeats over seeds, and pattern detectors.

A bench is an object with a `name`, a `title`, the settings class it takes (`melbo.bench.settings`) and
`run(lm, out, settings, progress, on_batch) -> BenchResult`; `get_bench(name)` finds it (arithmetic, refusal,
backdoor, diff, monitor). `run_seeds` repeats one over K discovery seeds and aggregates.

bench.json and its reader, `BenchResult`, live in `melbo.io.benchfile` with the other storage formats (the report
and the catalogue read it without importing the benches); they are re-exported here. Every rate a bench reports is also a row of its "rates" table
(`add_rate`: hits, n, rate and its 95% Wilson interval as separate numeric columns), and every steered-vs-unsteered
comparison on the same items a row of its "paired" table (`add_paired`: the discordant counts, the difference with
a paired bootstrap interval and the exact McNemar p); `melbo.stats` computes them. `melbo report` shows the
tables of a run directory's bench.json in a "Benchmark" section.
"""

from __future__ import annotations

import re
import time
from pathlib import Path
from importlib import import_module
from typing import Callable, Iterable, Optional, Protocol, Sequence

from melbo.checks import check_count_bound
from melbo.errors import MelboError
from melbo.numbers import format_cell
from melbo.stats import bootstrap_mean
from melbo.io.files import write_jsonl  # noqa: F401  (the benches write bench_completions.jsonl with it)
from melbo.io.benchfile import (BENCH, PAIRED, PAIRED_COLUMNS, RATE_COLUMNS, RATES, SEED_COLUMNS,  # noqa: F401
                             SEEDS, BenchResult, BenchTable)  # (re-exported: every bench reads them here)

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
    from melbo.io.files import make_output_dir

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

