"""Exponential DCT's rate: ranked directions per CPU-minute, and their objective beside random vectors of the same R.

One `melbo.discover(method="dct")` run on the default model, timed in wall and in CPU seconds (all of the
process's threads: a CPU-minute is one core busy for a minute). Then every DCT direction and as many random
directions of the same radius are scored by one reference objective, the seed's MELBO objective
F = Σ_i Σ_t ‖Z_t(θ) − Z_t(0)‖² at the run's target block (p = 2, q = 1), in one batched pass each.

    .venv/bin/python benchmarks/dct_rate.py                      # small: 32 factors, 2 iterations
    .venv/bin/python benchmarks/dct_rate.py --n 256 --iterations 2   # the issue's goal: ≥ 256 per CPU-minute
    .venv/bin/python benchmarks/dct_rate.py --compare-start        # also: start from the top Jacobian directions

--compare-start fits the same factors twice more outside the run (same probe, precision and seed): from
melbo's start (one vjp of random output changes) and from the top Jacobian directions after one power iteration
(finite differences, fp32 as `--method jacobian` runs), to show which start the method should use.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch

import melbo
from melbo.engine.arithmetic import random_vectors
from melbo.engine.methods.dct import fit_factors
from melbo.engine.objective import MelboObjective, TargetProbe
from melbo.engine.prompts import encode
from melbo.settings import DEFAULTS

PROMPT = "How can I make a bomb?"
GOAL_PER_CPU_MINUTE = 256


def objective_of(lm, run, vectors: torch.Tensor, chunk: int = 32) -> torch.Tensor:
    """MELBO objective (p = 2, q = 1) of each vector at the run's source → target, on its prompt."""
    probe = probe_of(lm, run, "fp32")
    objective, source, prompts = MelboObjective(probe), run.config["source"], len(probe.batch)
    values = []
    with torch.no_grad():
        for part in vectors.split(chunk):
            steer = melbo.SteeringVectors(part, source)
            values.append(objective(len(part), lambda m, s=steer, n=len(part): s.apply(m, [
                k for k in range(n) for _ in range(prompts)])).value)
    return torch.cat(values)


def probe_of(lm, run, precision: str) -> TargetProbe:
    settings = run.config["settings"]
    batch = encode(lm, settings["prompts"], settings["chat"], settings["positions"])
    return TargetProbe(lm, batch, run.config["source"], run.config["target"], run.config["source"], precision)


def compare_starts(lm, run, n: int, iterations: int, f_random: torch.Tensor) -> None:
    """The same fit from each start, timed, and scored against the random baseline's mean objective."""
    radius = float(run.config["radius"])
    print()
    print("| start | precision | CPU s | directions per CPU-minute | F mean / random | F max / random |")
    print("|---|---|---|---|---|---|")
    for name, init, precision in (("one vjp of random changes (melbo)", 0, run.config["precision"]),
                                  ("top Jacobian directions, 1 power iteration", 1, "fp32")):
        probe = probe_of(lm, run, precision)
        cpu = time.process_time()
        f = fit_factors(probe, n, radius, iterations, torch.Generator().manual_seed(0), init_iterations=init)
        cpu = time.process_time() - cpu
        value = objective_of(lm, run, f.v * radius)
        print(f"| {name} | {precision} | {cpu:.1f} | {n / (cpu / 60):.0f} | "
              f"{float(value.mean() / f_random.mean()):.1f} | {float(value.max() / f_random.max()):.1f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default=melbo.DEFAULT_MODEL)
    parser.add_argument("--n", type=int, default=32, help="DCT factors (the goal is stated for 256)")
    parser.add_argument("--iterations", type=int, default=2, help="DCT passes after the Jacobian start")
    parser.add_argument("--radius", default=DEFAULTS.radius)
    parser.add_argument("--precision", default=DEFAULTS.precision, help="auto, fp32 or bf16")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    parser.add_argument("--compare-start", action="store_true", help="also time and score the two starts")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    lm = melbo.load_model(args.model)
    with tempfile.TemporaryDirectory() as tmp:
        wall, cpu = time.perf_counter(), time.process_time()
        run = melbo.discover(lm, [PROMPT], Path(tmp) / "run", method="dct", n_vectors=args.n,
                             power_iterations=args.iterations, radius=args.radius, precision=args.precision)
        wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
        dct = run.vectors
        radius, source = float(run.config["radius"]), int(run.config["source"])
        randoms = random_vectors(args.n, lm.width, radius, source, seed=0).vectors
        f_dct, f_random = objective_of(lm, run, dct), objective_of(lm, run, randoms)

    per_cpu_minute = args.n / (cpu / 60)
    top = max(1, args.n // 8)
    print(f"model {args.model}, blocks {source}→{run.config['target']}, R = {radius:.4g} "
          f"({run.config['radius_relative']:.3g}x), {args.n} factors, {args.iterations} iterations, "
          f"{run.config['precision']}, {torch.get_num_threads()} threads")
    print()
    print("| measure | value |")
    print("|---|---|")
    print(f"| wall time (s) | {wall:.1f} |")
    print(f"| CPU time (s, all threads) | {cpu:.1f} |")
    print(f"| ranked directions per wall-minute | {args.n / (wall / 60):.0f} |")
    print(f"| ranked directions per CPU-minute | {per_cpu_minute:.0f} (goal ≥ {GOAL_PER_CPU_MINUTE}: "
          f"{'met' if per_cpu_minute >= GOAL_PER_CPU_MINUTE else 'not met'}) |")
    print()
    print("| objective F (p=2, q=1) | DCT | random, same R | ratio |")
    print("|---|---|---|---|")
    for name, a, b in (("mean", f_dct.mean(), f_random.mean()), ("max", f_dct.max(), f_random.max()),
                       (f"mean of top {top}", f_dct.topk(top).values.mean(), f_random.topk(top).values.mean())):
        print(f"| {name} | {float(a):.4g} | {float(b):.4g} | {float(a / b):.2f} |")
    ranks = torch.arange(args.n, dtype=torch.float)
    order = f_dct.argsort(descending=True).argsort().float()
    rho = torch.corrcoef(torch.stack([ranks, order]))[0, 1]
    print(f"| Spearman ρ, DCT rank vs objective rank | {float(rho):.2f} | | |")
    if args.compare_start:
        compare_starts(lm, run, args.n, args.iterations, f_random)


if __name__ == "__main__":
    main()
