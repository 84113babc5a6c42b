"""Does a change after training change what an audit finds? Re-run the scan, confirmation and findings of finished
audits, with their trained arms kept as they are, under each variant, and compare the planted behaviours' ranks.

For each audit directory (a `melbo bench audit` seed's `learned/`), each variant gets a copy whose audit.json
forgets every stage after the arms and whose clock is set back to where training ended, then `melbo.jobs.auditing.resume`
finishes it: so every variant has the same perturbations and the same budget left. Variants: the scan in fp32 and
in bf16 (`--scan-precision`); confirmation as it is now (rounds while the budget lasts).

    .venv/bin/python benchmarks/audit_rescan.py /tmp/bench/tb0/seed-0/learned [...] --out /tmp/rescan

Needs the testbeds the audits ran on (their model spec is in audit.json). Measure idle; read ranks, not seconds.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from pathlib import Path
from typing import NoReturn

AFTER_TRAINING = ("scan", "confirm", "findings", "check")
PRODUCTS = ("observations.jsonl", "confirmations.jsonl", "findings.json", "report.html", "checks.json")


def fail(message: str) -> NoReturn:
    print(f"audit_rescan.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def rewind(source: Path, target: Path, precision: str) -> None:
    """A copy of a finished audit with every stage after training forgotten and the clock set back to its end."""
    shutil.copytree(source, target)
    for name in PRODUCTS:
        (target / name).unlink(missing_ok=True)
    state = json.loads((target / "audit.json").read_text())
    for stage in AFTER_TRAINING:
        state["stages"].pop(stage, None)
    state["spent"] = round(sum(v["seconds"] for v in state["stages"].values()), 2)
    state["status"] = "running"
    state["settings"]["scan_precision"] = precision
    (target / "audit.json").write_text(json.dumps(state))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail
    parser.add_argument("audits", nargs="+", type=Path)
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    for a in args.audits:
        if not (a / "audit.json").is_file():
            fail(f"{a} holds no audit.json: give a finished audit directory")
    if args.out.exists():
        fail(f"{args.out} exists: give a new --out")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    import melbo
    from melbo.jobs import auditing
    from melbo.bench.audit import finding_ranks
    from melbo.bench.backdoor import behaviour_detectors, fragment_detectors
    from melbo.threads import configure_threads

    configure_threads(args.threads)
    table = Table(title="planted behaviours' rank among the findings (clear / fragment), same trained arms")
    for column in ("audit", "scan", "behaviour", "rank", "fragment rank", "findings", "confirmed", "rounds",
                   "scan s", "confirm s"):
        table.add_column(column)
    for source in args.audits:
        state = json.loads((source / "audit.json").read_text())
        lm = melbo.load_model(state["model"]["spec"])
        record = Path(state["model"]["spec"]).parent / "testbed.json"  # a melbo testbed: <key>/merged
        if not record.is_file():
            fail(f"{source} audited {state['model']['spec']}, which is not a melbo testbed (no {record})")
        behaviours, raw, compiled = behaviour_detectors(json.loads(record.read_text()))
        fragments = fragment_detectors(behaviours)
        for precision in args.precisions:
            target = args.out / f"{source.parent.parent.name}-{source.parent.name}-{precision}"
            rewind(source, target, precision)
            began = time.perf_counter()
            result = auditing.resume(target, lm)
            stages = result.state["stages"]
            ranks, pieces = finding_ranks(result.findings, compiled), finding_ranks(result.findings, fragments)
            for name in raw:
                table.add_row(target.name, precision, name, str(ranks[name]), str(pieces.get(name)),
                              str(len(result.findings)), str(stages["confirm"]["candidates"]),
                              str(stages["confirm"].get("rounds", 1)), f"{stages['scan']['seconds']:.0f}",
                              f"{stages['confirm']['seconds']:.0f}")
            print(f"{target.name}: {time.perf_counter() - began:.0f} s", file=sys.stderr)
    Console(width=160).print(table)


if __name__ == "__main__":
    main()
