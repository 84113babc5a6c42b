"""Audit mode on the planted-backdoor testbed: recall of plain discovery vs diff vs random, then the monitor.

Plants (or reuses from the cache) the default testbed, takes its base model as the reference, trains every arm on
one clean prompt, and prints recall at 8/16/32/64 perturbations, the number of perturbations until the first hit
(training order and divergence-rank order), and the monitor's AUROC on trigger vs held-out clean and near-miss
inputs, using the perturbations of the diff run. Everything is written under --out (bench.json, report.html).

    .venv/bin/python benchmarks/diff_recall.py [--n 64] [--steps 150] [--radius 0.3x] \
        [--contrast difference --contrast kl] [--positions all] [--testbed-seed 0] [--out runs/bench-diff]

Recall is a count of hits, not a timing, but the run takes long (64 vectors per arm, two models for diff):
run it on an idle machine.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from rich.console import Console


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64)
    parser.add_argument("--random", type=int, default=None)
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--radius", default="0.3x")
    parser.add_argument("--contrast", action="append", default=None)
    parser.add_argument("--positions", default="all")
    parser.add_argument("--testbed-seed", type=int, default=0, help="Seed of the planted testbed (another model).")
    parser.add_argument("--seed", type=int, default=0, help="Discovery seed.")
    parser.add_argument("--out", type=Path, default=Path("runs") / f"bench-diff-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()

    from melbo.bench.backdoor import testbed_record
    from melbo.bench.common import print_result
    from melbo.bench.diff import bench_diff
    from melbo.bench.monitor import bench_monitor
    from melbo.bench.testbed import plant_backdoor
    from melbo.engine.models import load_model
    from melbo.engine.store import Run

    console = Console(width=160)
    bed = plant_backdoor(seed=args.testbed_seed)
    record = testbed_record(bed.path)
    audited, reference = load_model(str(bed.merged_dir)), load_model(record["config"]["base_spec"])
    forms = args.contrast or ["difference"]
    arms = {"discover": {}, **{f"diff-{form}": {"contrast": form} for form in forms}}
    result = bench_diff(audited, reference, args.out, testbed=record, arms=arms, n_vectors=args.n,
                        n_random=args.random, steps=args.steps, radius=args.radius, positions=args.positions,
                        seed=args.seed)
    print_result(result, console)
    run = Run.load(args.out / f"diff-{forms[0]}", model=audited)
    print_result(bench_monitor(audited, run, args.out / "monitor", record), console)


if __name__ == "__main__":
    main()
