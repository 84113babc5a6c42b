"""The audit's results table: for each `melbo bench audit` directory, each planted behaviour's rank per seed, the
wall time, and the random control; then the stage shares of the learned audits.

    .venv/bin/python benchmarks/audit_findings.py NAME=DIR [NAME=DIR ...]

DIR is a `melbo bench audit --seeds K --out DIR` directory (seed-S/ inside), or a single-seed one, or several
single-seed directories joined with commas (a seed rerun on its own). The audits themselves are the measurement,
run with `melbo bench audit -m TESTBED --budget 10m --seeds 3` on an idle machine: the audit sizes its arms from
the training speed it measures, so a busy machine trains fewer perturbations.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from melbo.stats import wilson


def seed_dirs(spec: str) -> list[Path]:
    dirs = []
    for part in spec.split(","):
        path = Path(part)
        seeds = sorted(path.glob("seed-*"))
        dirs += seeds if seeds else [path]
    return dirs


def rows_of(bench: dict) -> list[list]:
    table = next(t for t in bench["tables"] if t["title"].startswith("rank of the first finding"))
    return table["rows"]


def main(specs: list[str]) -> None:
    print("| testbed | behaviour | rank per seed (learned) | in the top 5 | learned wall s | random: findings, "
          "planted found | random wall s |")
    print("|---|---|---|---|---|---|---|")
    shares: dict[str, list[float]] = {}
    for spec in specs:
        name, _, where = spec.partition("=")
        runs = [json.loads((d / "bench.json").read_text()) for d in seed_dirs(where)]
        behaviours = list(dict.fromkeys(r[1] for r in rows_of(runs[0])))
        for b in behaviours:
            learned = [next(r for r in rows_of(run) if r[0] == "learned" and r[1] == b) for run in runs]
            random = [next(r for r in rows_of(run) if r[0] == "random" and r[1] == b) for run in runs]
            found = sum(bool(r[3]) for r in learned)
            e = wilson(found, len(learned))
            ranks = ", ".join("—" if r[2] is None else str(r[2]) for r in learned)
            walls = ", ".join(f"{r[5]:.0f}" for r in learned)
            rnd = ", ".join(f"{r[4]}, {'yes' if r[3] else 'no'}" for r in random)
            print(f"| {name} | {b} | {ranks} | {found}/{len(learned)} [{e.low:.2f}, {e.high:.2f}] | {walls} | "
                  f"{rnd} | {', '.join(f'{r[5]:.0f}' for r in random)} |")
        for d in seed_dirs(where):
            state = json.loads((d / "learned" / "audit.json").read_text())
            total = sum(s.get("seconds", 0) for s in state["stages"].values())
            for stage, s in state["stages"].items():
                key = "training" if stage.startswith("arm ") else stage
                shares.setdefault(key, []).append(s.get("seconds", 0) / total)
    n = len(next(iter(shares.values())))
    print()
    print("stage shares of the learned audits' wall time (mean over " + str(n) + " audits): " +
          ", ".join(f"{k} {sum(v) / n:.0%}" for k, v in shares.items()))


if __name__ == "__main__":
    main(sys.argv[1:])
