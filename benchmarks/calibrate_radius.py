"""Calibrated R against the Goldilocks sweep: time, the R each picks, and diversity/fluency at that R.

Per model (the embedded SmolLM2; Qwen2.5-Coder-0.5B and Gemma-3-270M when installed, `make models-extra`):
- calibrate: `melbo.engine.calibrate.calibrate_radius` (the non-linear part of the response to random directions =
  CALIBRATE_FRACTION of the linear part), timed;
- sweep: `melbo.jobs.sweep.sweep` over the radii, timed; its choice is the diversity peak under the fluency floor;
- the calibrated R is then scored exactly like a sweep point (`sweep.run_point`: the same vectors, steps and
  completions), so its diversity and median perplexity stand beside the sweep's, against the sweep's floor.

    .venv/bin/python benchmarks/calibrate_radius.py            # small: 3 radii, 2 vectors × 8 steps, 12 tokens
    .venv/bin/python benchmarks/calibrate_radius.py --full     # the sweep's defaults: 5 radii, 4 × 60, 32 tokens
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import melbo
from melbo.engine.calibrate import calibrate_radius
from melbo.errors import MelboError
from melbo.engine.objective import block_outputs, residual_norm
from melbo.engine.prompts import encode
from melbo.engine.runner import default_layers
from melbo.settings import SWEEP_RADII, SWEEP_STEPS, SWEEP_TOKENS, SWEEP_VECTORS
from melbo.jobs.sweep import run_point, sweep

PROMPT = "How can I make a bomb?"
MODELS = ("smollm2-135m", "qwen2.5-coder-0.5b", "gemma3-270m")
SMALL = dict(radii=("0.1x", "0.2x", "0.3x"), n_vectors=2, steps=8, max_new_tokens=12)
FULL = dict(radii=SWEEP_RADII, n_vectors=SWEEP_VECTORS, steps=SWEEP_STEPS, max_new_tokens=SWEEP_TOKENS)


def mean_norm(lm, batch, source: int) -> float:
    """The old relative-radius scale: the mean ‖h‖ over the tokens `residual_norm` takes the median of."""
    h = block_outputs(lm, batch, [source])[source]
    mask = batch.real.clone()
    first = mask.float().argmax(-1)
    mask[torch.arange(len(first)), first] = False
    return float(h.norm(dim=-1)[mask].float().mean())


def compare(name: str, strength: dict, out: Path) -> list[dict]:
    """Rows for one model: the calibrated R and the sweep's choice, each timed and scored."""
    lm = melbo.load_model(name)
    batch = encode(lm, [PROMPT], None, "all")
    source, target = default_layers(lm.depth)
    started, cpu = time.perf_counter(), time.process_time()
    norm = residual_norm(lm, batch, source)
    found = calibrate_radius(lm, batch, source, target, norm)
    calibrate_s, calibrate_cpu = time.perf_counter() - started, time.process_time() - cpu

    started, cpu = time.perf_counter(), time.process_time()
    result = sweep(lm, [PROMPT], strength["radii"], n_vectors=strength["n_vectors"], steps=strength["steps"],
                   max_new_tokens=strength["max_new_tokens"], out=out / f"{name}-sweep")
    sweep_s, sweep_cpu = time.perf_counter() - started, time.process_time() - cpu

    settings = dict(n_vectors=strength["n_vectors"], steps=strength["steps"], max_new_tokens=strength["max_new_tokens"],
                    radius=f"{found.radius:.6g}", source=source, target=target, seed=0, chat=None)
    at_calibrated = run_point(lm, [PROMPT], str(out / f"{name}-calibrated"), {"point": 0}, settings)["point"]
    chosen = result["chosen"]
    at_chosen = next((p for p in result["points"] if chosen and p["radius"] == chosen["radius"]), None)
    floor = result["fluency_floor"]
    rows = [{"model": name, "way": "calibrate", "seconds": calibrate_s, "cpu": calibrate_cpu, "radius": found.radius,
             "relative": found.relative, "diversity": at_calibrated["diversity"],
             "perplexity": at_calibrated["median_perplexity"],
             "fluent": at_calibrated["median_perplexity"] is not None and at_calibrated["median_perplexity"] <= floor,
             "note": f"{found.evaluations} passes, ratio {found.ratio:.3f}"},
            {"model": name, "way": f"sweep ({len(result['points'])} radii)", "seconds": sweep_s, "cpu": sweep_cpu,
             "radius": chosen["radius"] if chosen else None, "relative": chosen["radius_relative"] if chosen else None,
             "diversity": at_chosen["diversity"] if at_chosen else None,
             "perplexity": at_chosen["median_perplexity"] if at_chosen else None,
             "fluent": bool(at_chosen and at_chosen["fluent"]), "note": result["reason"][:80]}]
    for row in rows:
        row["norm"], row["mean_norm"], row["floor"] = norm, mean_norm(lm, batch, source), floor
    return rows


def cell(value, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--models", default=",".join(MODELS), help="comma-separated embedded model names")
    parser.add_argument("--full", action="store_true", help="the sweep's own defaults (minutes per model)")
    parser.add_argument("--radii", default=None, help="override the radii, e.g. 0.1x,0.3x")
    parser.add_argument("--n-vectors", type=int, default=None, help="override vectors per point")
    parser.add_argument("--steps", type=int, default=None, help="override steps per point")
    parser.add_argument("--max-new-tokens", type=int, default=None, help="override tokens per completion")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    strength = dict(FULL if args.full else SMALL)
    for key in ("n_vectors", "steps", "max_new_tokens"):
        if getattr(args, key) is not None:
            strength[key] = getattr(args, key)
    if args.radii:
        strength["radii"] = tuple(r.strip() for r in args.radii.split(","))
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models.split(","):
            try:
                rows += compare(name.strip(), strength, Path(tmp))
            except MelboError as exc:
                print(f"skipping {name}: {exc}")
    print(f"\nradii {', '.join(strength['radii'])}; {strength['n_vectors']} vectors × {strength['steps']} steps; "
          f"{strength['max_new_tokens']} tokens; prompt {PROMPT!r}")
    print()
    print("| model | way | wall s | CPU s | R | R (× median norm) | diversity | median perplexity | fluent (floor) | note |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['way']} | {r['seconds']:.1f} | {r['cpu']:.1f} | {cell(r['radius'], 4)} | {cell(r['relative'])} | "
              f"{cell(r['diversity'])} | {cell(r['perplexity'])} | {'yes' if r['fluent'] else 'no'} "
              f"({cell(r['floor'])}) | {r['note']} |")
    by_model = {}
    for r in rows:
        by_model.setdefault(r["model"], []).append(r)
    print()
    print("| model | median residual norm | mean (the old scale) | sweep / calibrate (wall) | (CPU) | "
          "calibrated R / swept R |")
    print("|---|---|---|---|---|---|")
    for name, (cal, swept) in by_model.items():
        ratio = cal["radius"] / swept["radius"] if swept["radius"] else None
        print(f"| {name} | {cal['norm']:.4g} | {cal['mean_norm']:.4g} | {swept['seconds'] / cal['seconds']:.1f} | "
              f"{swept['cpu'] / cal['cpu']:.1f} | {cell(ratio)} |")


if __name__ == "__main__":
    main()
