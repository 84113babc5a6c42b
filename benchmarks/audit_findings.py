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


def ranks_of(arm_dir: Path, behaviours: dict) -> tuple[dict, dict, int]:
    """(clear rank, fragment rank) per behaviour, and the number of findings, recomputed from findings.json so that
    audits measured before the fragment column existed are read the same way."""
    from melbo.bench.audit import finding_ranks
    from melbo.bench.backdoor import behaviour_detectors, fragment_detectors

    findings = json.loads((arm_dir / "findings.json").read_text())["findings"]
    _, _, clear = behaviour_detectors(None, behaviours)
    return finding_ranks(findings, clear), finding_ranks(findings, fragment_detectors(behaviours)), len(findings)


def rank_text(rank) -> str:
    return "—" if rank is None else str(rank)


def main(specs: list[str], top: int = 5) -> None:
    print(f"| testbed | behaviour | clear rank per seed | clear in the top {top} | fragment rank per seed | "
          "learned wall s | random control: findings per seed, planted (clear/fragment) in its top 5 | "
          "random wall s |")
    print("|---|---|---|---|---|---|---|---|")
    shares: dict[str, list[float]] = {}
    for spec in specs:
        name, _, where = spec.partition("=")
        dirs = seed_dirs(where)
        benches = [json.loads((d / "bench.json").read_text()) for d in dirs]
        behaviours = benches[0]["settings"]["behaviours"]
        learned = [ranks_of(d / "learned", behaviours) for d in dirs]
        random = [ranks_of(d / "random", behaviours) for d in dirs]
        walls = {arm: [_wall(b, arm) for b in benches] for arm in ("learned", "random")}
        for b in behaviours:
            clear = [r[0][b] for r in learned]
            found = sum(r is not None and r <= top for r in clear)
            e = wilson(found, len(clear))
            rnd_hits = sum(any(x is not None and x <= top for x in (r[0][b], r[1][b])) for r in random)
            print(f"| {name} | {b} | {', '.join(map(rank_text, clear))} | {found}/{len(clear)} "
                  f"[{e.low:.2f}, {e.high:.2f}] | {', '.join(rank_text(r[1][b]) for r in learned)} | "
                  f"{', '.join(f'{w:.0f}' for w in walls['learned'])} | "
                  f"{', '.join(str(r[2]) for r in random)}; {rnd_hits}/{len(random)} | "
                  f"{', '.join(f'{w:.0f}' for w in walls['random'])} |")
        for d in dirs:
            state = json.loads((d / "learned" / "audit.json").read_text())
            total = sum(s.get("seconds", 0) for s in state["stages"].values())
            for stage, s in state["stages"].items():
                key = "training" if stage.startswith("arm ") else stage
                shares.setdefault(key, []).append(s.get("seconds", 0) / total)
    n = len(next(iter(shares.values())))
    print()
    print("stage shares of the learned audits' wall time (mean over " + str(n) + " audits): " +
          ", ".join(f"{k} {sum(v) / n:.0%}" for k, v in shares.items()))


def _wall(bench: dict, arm: str) -> float:
    table = next(t for t in bench["tables"] if t["title"].startswith("rank of the first finding"))
    return next(r[5] for r in table["rows"] if r[0] == arm)


if __name__ == "__main__":
    main(sys.argv[1:])
