"""The triggers results table: for each `melbo bench triggers` directory, the output monitor against the activation
monitor, the corpus ranks of the planted triggers, inversion, and the cost against generating every input.

    .venv/bin/python benchmarks/trigger_findings.py NAME=DIR [NAME=DIR ...]

DIR is a `melbo bench triggers AUDIT/learned --out DIR` directory (its bench.json). The benches are the
measurement; this script only reads and prints them.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def table(bench: dict, prefix: str) -> dict:
    return next(t for t in bench["tables"] if t["title"].startswith(prefix))


def rows_by(bench: dict, prefix: str, key: int = 0) -> dict:
    t = table(bench, prefix)
    return {tuple(r[:key + 1]) if key else r[0]: dict(zip(t["columns"], r)) for r in t["rows"]}


def main(specs: list[str]) -> None:
    print("| testbed | behaviour: finding | output monitor AUROC vs clean / near miss | activation monitor | "
          "flagged (output): triggers / clean / near miss | corpus ranks of its 2 triggers (of 148) | "
          "inversion: exhaustive rank / gradient search shows it |")
    print("|---|---|---|---|---|---|---|")
    costs = []
    for spec in specs:
        name, _, where = spec.partition("=")
        bench = json.loads((Path(where) / "bench.json").read_text())
        monitor = table(bench, "monitor")
        cells = {(r[0].split()[0], r[1]): dict(zip(monitor["columns"], r)) for r in monitor["rows"]}
        corpus = rows_by(bench, "corpus")
        inversion = rows_by(bench, "inversion")
        for behaviour, c in corpus.items():
            out, act = cells[("output", behaviour)], cells[("target", behaviour)]
            inv = inversion.get(behaviour, {})
            gradient = inv.get("its answer shows it")
            print(f"| {name} | {behaviour}: #{c['finding']} | {out['AUROC vs clean']:.2f} / "
                  f"{out['AUROC vs near miss']:.2f} | {act['AUROC vs clean']:.2f} / {act['AUROC vs near miss']:.2f} | "
                  f"{out['flagged: positives']:.0%} / {out['flagged: clean']:.0%} / {out['flagged: near miss']:.0%} | "
                  f"{c['ranks (its finding)']} | {inv.get('exhaustive: rank of the first true trigger', '—')} / "
                  f"{'yes' if gradient is True else 'no' if gradient is False else '—'} |")
        cost = rows_by(bench, "cost")
        scoring = next(v for k, v in cost.items() if k.startswith("phrase spotting"))
        generating = next(v for k, v in cost.items() if k.startswith("generate"))
        costs.append(f"{name}: {scoring['forward passes']} passes, {scoring['seconds']:.0f} s against "
                     f"{generating['forward passes']} passes, {generating['seconds']:.0f} s")
    print()
    print("cost of scoring the corpus against generating 48 tokens for every input: " + "; ".join(costs))


if __name__ == "__main__":
    main(sys.argv[1:])
