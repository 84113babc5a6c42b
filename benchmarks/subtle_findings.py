"""The algorithmic-backdoor table: per testbed and arm, how many perturbations make the chain of thought switch + to *
consistently (on at least half of the clean prompts), learned against random vectors of the same norm.

    .venv/bin/python benchmarks/subtle_findings.py NAME=DIR[,DIR...] [NAME=...]

Each DIR is a `melbo bench subtle -m COT_TESTBED --seed S --out DIR` directory; several DIRs of one testbed (one
per discovery seed) are pooled: their perturbations add up, and the interval is Wilson's over all of them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from melbo.stats import wilson

PATTERN = "sum→product"


def main(specs: list[str]) -> None:
    print(f"| testbed | arm | seeds | learned: consistent {PATTERN} (95% Wilson) | random: the same | "
          "other patterns, learned / random (any, consistent) | wall s |")
    print("|---|---|---|---|---|---|---|")
    for spec in specs:
        name, _, where = spec.partition("=")
        benches = [json.loads((Path(d) / "bench.json").read_text()) for d in where.split(",")]
        arms = list(dict.fromkeys(r[0] for r in benches[0]["tables"][0]["rows"]))
        for arm in arms:
            rows = [r for b in benches for r in b["tables"][0]["rows"] if r[0] == arm]
            cols = benches[0]["tables"][0]["columns"]
            cells = [dict(zip(cols, r)) for r in rows]
            mine = [c for c in cells if c["pattern"] == PATTERN]
            k, n = sum(c["learned"] for c in mine), sum(c["vectors"] for c in mine)
            kr = sum(c["random"] for c in mine)
            # random vectors per run: the bench's n_random, or as many as learned when it was left unset
            nr = sum(b["settings"].get("n_random") or c["vectors"] for b, c in zip(benches, mine))
            e, er = wilson(k, n), wilson(kr, nr)
            others = [c for c in cells if c["pattern"] != PATTERN]
            other = ", ".join(f"{p} {sum(c['learned'] for c in others if c['pattern'] == p)}/"
                              f"{sum(c['random'] for c in others if c['pattern'] == p)}"
                              for p in dict.fromkeys(c["pattern"] for c in others))
            wall = sum(b["wall_seconds"] for b in benches)
            print(f"| {name} | {arm} | {len(benches)} | {k}/{n} = {e.text()} | {kr}/{nr} = {er.text()} | {other} | "
                  f"{wall:.0f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
