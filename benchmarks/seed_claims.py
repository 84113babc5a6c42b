"""The seed's three claims at full strength, in one run: one table of rates with intervals, paired tests, runtimes.

    python benchmarks/seed_claims.py                        # full strength: about 40 min a seed on 2 idle cores
                                                            # (arithmetic 28, refusal 7, backdoor about 7)
    python benchmarks/seed_claims.py --only refusal         # one bench
    python benchmarks/seed_claims.py --quick --model smollm2-135m   # seconds: checks that it runs, not numbers

Runs `melbo bench arithmetic`, `refusal` and `backdoor` (library calls, default settings = the fair ones in
`melbo.bench.settings`) into --out/<bench>/, over --seeds discovery seeds, and prints every headline rate with its
95% interval, the paired comparisons (exact McNemar) and each bench's wall time. The README's results table is
filled from this output.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import time
from pathlib import Path

BENCHES = ("arithmetic", "refusal", "backdoor")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", choices=BENCHES, action="append", default=None)
    parser.add_argument("--model", default=None, help="Model for arithmetic and refusal (default qwen2.5-coder-0.5b).")
    parser.add_argument("--seeds", type=int, default=1, help="Discovery seeds per bench.")
    parser.add_argument("--quick", action="store_true", help="Scaled-down settings.")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"seed-claims-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    from melbo.bench.backdoor import resolve_model
    from melbo.bench.common import PAIRED, RATES, SEEDS, get_bench, run_seeds
    from melbo.io.files import make_output_dir
    from melbo.engine.models import load_model

    console = Console(width=170)
    make_output_dir(args.out)
    rates = Table(title="rates (95% intervals: Wilson for one run, bootstrap over seeds for several)",
                  title_justify="left", header_style="bold")
    for col in ("bench", "arm", "measure", "n", "rate [interval]", "wall s"):
        rates.add_column(col)
    paired = Table(title="paired comparisons on the same items (exact McNemar)", title_justify="left",
                   header_style="bold")
    for col in ("bench", "first", "second", "measure", "n", "only first", "only second", "difference", "p"):
        paired.add_column(col)
    for name in args.only or BENCHES:
        bench = get_bench(name)
        settings = bench.settings.quick() if args.quick else bench.settings()
        if name == "backdoor":
            spec, record = resolve_model("auto")
            settings = dataclasses.replace(settings, testbed=record, report=False)
        else:
            module = __import__(f"melbo.bench.{name}", fromlist=["DEFAULT_MODEL"])
            spec = args.model or module.DEFAULT_MODEL
        lm = load_model(spec)
        started = time.perf_counter()
        result = run_seeds(bench, lm, args.out / name, settings, args.seeds)
        wall = time.perf_counter() - started
        over_seeds = result.find(SEEDS)
        if over_seeds is not None:
            for arm, measure, seeds, mean, low, high, _ in over_seeds.rows:
                rates.add_row(name, arm, measure, f"{seeds} seeds", _interval(mean, low, high), f"{wall:.0f}")
        for arm, measure, hits, n, value, low, high in (result.find(RATES).rows if result.find(RATES) else []):
            rates.add_row(name, arm, measure, str(n), _interval(value, low, high), f"{wall:.0f}")
        for row in (result.find(PAIRED).rows if result.find(PAIRED) else []):
            first, second, measure, n, _, only_first, only_second, _, diff, low, high, p = row
            paired.add_row(name, first, second, measure, str(n), str(only_first), str(only_second),
                           _interval(diff, low, high), f"{p:.3g}")
    console.print(rates)
    console.print(paired)
    console.print(f"runs under {args.out}")


def _interval(value, low, high) -> str:
    if value is None:
        return "—"
    if low is None or high is None:
        return f"{value:.2f}"
    return f"{value:.2f} [{low:.2f}, {high:.2f}]"


if __name__ == "__main__":
    main()
