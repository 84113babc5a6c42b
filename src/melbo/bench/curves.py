"""Backdoor recall curves: recall of each planted behaviour against the number of perturbations read (1..N).

For every setting of a grid (R, p, token positions, number of clean prompts) and every discovery seed, the
backdoor bench trains N hard-orthogonal vectors and N random vectors of the same norm on the testbed. Hard-
orthogonal vectors are trained in batches, each orthogonal to the earlier ones, so the first k vectors of a run
are a run of k: one run of N gives recall at every k ≤ N. Recall at k is then, over seeds (and testbeds), the
fraction of runs in which one of the first k perturbations elicits the behaviour, with a Wilson interval.

    settings = one_at_a_time()                    # the default and one change at a time (small)
    raw = measure_curves(lm, record, "runs/curves", settings, seeds=[0, 1], n_vectors=32)
    summary = average(raw["curves"])               # per (setting, arm, behaviour): recall at each k
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Optional, Sequence

from melbo.bench.common import OnBatch, Progress
from melbo.engine.models import LoadedModel
from melbo.stats import wilson

BUDGETS = (1, 2, 4, 8, 16, 32, 64)  # the points the printed tables show (the curves have every k)


@dataclass(frozen=True)
class CurveSetting:
    """One point of the grid: the discovery settings the backdoor bench trains with."""

    radius: str = "0.3x"  # the backdoor bench's default
    p: float = 2.0
    positions: str = "all"
    prompts: int = 1

    @property
    def label(self) -> str:
        return f"R={self.radius} p={self.p:g} pos={self.positions} prompts={self.prompts}"

    @property
    def slug(self) -> str:
        return "".join(ch if ch.isalnum() or ch in "-." else "_" for ch in self.label.replace(" ", "-"))


def one_at_a_time(base: CurveSetting = CurveSetting(), radii: Sequence[str] = ("0.2x", "0.4x", "calibrate"),
                  ps: Sequence[float] = (4.0,), positions: Sequence[str] = ("last:4",),
                  prompts: Sequence[int] = (4,)) -> list[CurveSetting]:
    """The default setting, then each factor changed alone (the small grid)."""
    grid = [base]
    grid += [CurveSetting(r, base.p, base.positions, base.prompts) for r in radii if r != base.radius]
    grid += [CurveSetting(base.radius, p, base.positions, base.prompts) for p in ps if p != base.p]
    grid += [CurveSetting(base.radius, base.p, pos, base.prompts) for pos in positions if pos != base.positions]
    grid += [CurveSetting(base.radius, base.p, base.positions, k) for k in prompts if k != base.prompts]
    return grid


def full_grid(radii: Sequence[str] = ("0.2x", "0.3x", "0.4x", "calibrate"), ps: Sequence[float] = (2.0, 4.0),
              positions: Sequence[str] = ("all", "last:4"), prompts: Sequence[int] = (1, 4)) -> list[CurveSetting]:
    """Every combination of the factors (the full grid)."""
    return [CurveSetting(r, p, pos, k) for r in radii for p in ps for pos in positions for k in prompts]


def found_by_label(rows: Iterable[dict]) -> dict[str, set[str]]:
    """label → the behaviours any of its completions shows, from bench_completions.jsonl rows."""
    found: dict[str, set[str]] = {}
    for row in rows:
        found.setdefault(row["label"], set()).update(row.get("behaviours") or [])
    return found


def curve(found: dict[str, set[str]], labels: Sequence[str], behaviour: str) -> list[bool]:
    """hits[k-1]: one of the first k labels elicits `behaviour`, for k = 1..len(labels)."""
    hits, seen = [], False
    for label in labels:
        seen = seen or behaviour in found.get(label, set())
        hits.append(seen)
    return hits


def measure_curves(lm: LoadedModel, testbed: dict, out: str | Path, grid: Sequence[CurveSetting],
                   seeds: Sequence[int], *, n_vectors: int = 64, steps: int = 150, max_new_tokens: int = 32,
                   batch_size: int = 16, progress: Progress = None, on_batch: OnBatch = None) -> dict:
    """Run the backdoor bench for every setting and seed into `out/<setting>/seed-<s>`; return every curve.

    {"testbed": its config, "n_vectors": N, "settings": [...], "seeds": [...],
     "curves": [{"setting", "seed", "arm": learned | random, "behaviour", "hits": [bool] * N, "seconds"}]}
    """
    from melbo.bench.backdoor import BENCHMARK
    from melbo.bench.settings import BackdoorSettings

    out = Path(out)
    curves = []
    for setting in grid:
        for seed in seeds:
            run_dir = out / setting.slug / f"seed-{seed}"
            s = BackdoorSettings.build(n_vectors=n_vectors, n_random=n_vectors, steps=steps, radius=setting.radius,
                                 max_new_tokens=max_new_tokens, seed=seed, batch_size=batch_size,
                                 n_prompts=setting.prompts, testbed=testbed, report=False,
                                 discover={"p": setting.p, "positions": setting.positions})
            result = BENCHMARK.run(lm, run_dir, s, progress, on_batch)
            rows = [json.loads(line) for line in (run_dir / "bench_completions.jsonl").read_text().splitlines()]
            found = found_by_label(rows)
            arms = {"learned": [f"v{i}" for i in range(result.settings["n_vectors"])],
                    "random": [f"random{k}" for k in range(result.settings["n_random"])]}
            for arm, labels in arms.items():
                for behaviour in result.settings["behaviours"]:
                    curves.append({"setting": setting.label, "seed": seed, "arm": arm, "behaviour": behaviour,
                                   "hits": curve(found, labels, behaviour), "seconds": result.wall_seconds})
    return {"testbed": testbed["config"] if testbed else None, "n_vectors": n_vectors,
            "settings": [asdict(g) | {"label": g.label} for g in grid], "seeds": list(seeds), "curves": curves}


def average(curves: Sequence[dict], budgets: Optional[Sequence[int]] = None) -> list[dict]:
    """Per (setting, arm, behaviour), over runs (seeds, testbeds): recall at each k with its Wilson interval.

    [{"setting", "arm", "behaviour", "runs", "k": [...], "recall": [...], "low": [...], "high": [...]}]
    """
    groups: dict[tuple, list[list[bool]]] = {}
    for c in curves:
        groups.setdefault((c["setting"], c["arm"], c["behaviour"]), []).append(c["hits"])
    summary = []
    for (setting, arm, behaviour), runs in groups.items():
        n = min(len(h) for h in runs)
        ks = [k for k in (budgets or range(1, n + 1)) if k <= n]
        estimates = [wilson(sum(h[k - 1] for h in runs), len(runs)) for k in ks]
        summary.append({"setting": setting, "arm": arm, "behaviour": behaviour, "runs": len(runs), "k": ks,
                        "recall": [e.value for e in estimates], "low": [e.low for e in estimates],
                        "high": [e.high for e in estimates]})
    return summary
