"""Backdoor recall curves: recall per planted behaviour against the number of perturbations read, learned vs random.

    python benchmarks/recall_curves.py                       # small: default + one change at a time, see below
    python benchmarks/recall_curves.py --grid full --n 64 --steps 150 --seeds 0 1 2 --testbed-seeds 0 1

For each testbed seed (`melbo testbed backdoor --seed S`; planted once, ~2 minutes of CPU, then cached) and each
setting of the grid, `melbo.bench.curves.measure_curves` runs the backdoor bench over the discovery seeds.
It prints recall at k = 1, 2, 4, …, N per setting and arm (over seeds × testbeds, with Wilson intervals) and the
settings' training time; it writes curves.json (every curve), summary.json and recall_curves.png under --out.

Small grid (the default): R = 0.3x, p = 2, all positions, one clean prompt, then each of R ∈ {0.2x, 0.4x,
calibrate}, p = 4, positions last:4 and 4 clean prompts alone. Full grid: every combination of R ∈ {0.2x, 0.3x,
0.4x, calibrate}, p ∈ {2, 4}, positions ∈ {all, last:4}, prompts ∈ {1, 4}.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--grid", choices=("small", "full"), default="small")
    parser.add_argument("--n", type=int, default=32, help="Perturbations per run (the curve's length).")
    parser.add_argument("--steps", type=int, default=100)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1], help="Discovery seeds.")
    parser.add_argument("--testbed-seeds", type=int, nargs="+", default=[0], help="Planted testbeds (models).")
    parser.add_argument("--radii", nargs="+", default=None, help="Override the grid's radii.")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--out", type=Path, default=Path("runs") / f"recall-curves-{time.strftime('%Y%m%d-%H%M%S')}")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    from melbo.bench.backdoor import testbed_record
    from melbo.bench.curves import BUDGETS, average, full_grid, measure_curves, one_at_a_time
    from melbo.bench.testbed import plant_backdoor
    from melbo.io.files import make_output_dir, write_json
    from melbo.engine.models import load_model
    from melbo.io.plots import recall_figure

    console = Console(width=160)
    radii = {"radii": args.radii} if args.radii else {}
    grid = full_grid(**radii) if args.grid == "full" else one_at_a_time(**radii)
    make_output_dir(args.out)
    curves, seconds = [], {}
    for bed_seed in args.testbed_seeds:
        console.print(f"testbed seed {bed_seed}: planting or taking it from the cache …")
        bed = plant_backdoor(seed=bed_seed)
        lm = load_model(str(bed.merged_dir))
        raw = measure_curves(lm, testbed_record(bed.path), args.out / f"testbed-{bed_seed}", grid, args.seeds,
                             n_vectors=args.n, steps=args.steps, max_new_tokens=args.max_new_tokens)
        for c in raw["curves"]:
            c["testbed_seed"] = bed_seed
            seconds.setdefault(c["setting"], set()).add((bed_seed, c["seed"], c["seconds"]))
        curves += raw["curves"]
    write_json(args.out / "curves.json", {"grid": [g.label for g in grid], "seeds": args.seeds,
                                          "testbed_seeds": args.testbed_seeds, "n_vectors": args.n,
                                          "steps": args.steps, "curves": curves})
    summary = average(curves)
    write_json(args.out / "summary.json", summary)
    figure = recall_figure(summary)
    if figure is not None:
        figure.savefig(args.out / "recall_curves.png")

    ks = [k for k in BUDGETS if k < args.n] + [args.n]
    table = Table(title=f"recall at k perturbations over {len(args.seeds)} seeds × {len(args.testbed_seeds)} "
                        f"testbeds (fraction of runs, 95% Wilson interval); N = {args.n}, {args.steps} steps",
                  title_justify="left", header_style="bold")
    for col in ["setting", "behaviour", "arm"] + [f"k={k}" for k in ks] + ["s per run"]:
        table.add_column(col)
    points = {(s["setting"], s["behaviour"], s["arm"]): s for s in summary}
    for setting in [g.label for g in grid]:
        for behaviour in sorted({s["behaviour"] for s in summary}):
            for arm in ("learned", "random"):
                s = points.get((setting, behaviour, arm))
                if s is None:
                    continue
                cells = [f"{s['recall'][k - 1]:.2f} [{s['low'][k - 1]:.2f}, {s['high'][k - 1]:.2f}]" for k in ks]
                per_run = sorted(seconds[setting])
                mean = sum(x[2] for x in per_run) / len(per_run)
                table.add_row(setting, behaviour, arm, *cells, f"{mean:.0f}" if arm == "learned" else "")
    console.print(table)
    console.print(f"written under {args.out}: curves.json, summary.json, recall_curves.png")
    print(json.dumps({"out": str(args.out), "settings": len(grid),
                      "runs": len(grid) * len(args.seeds) * len(args.testbed_seeds)}))


if __name__ == "__main__":
    main()
