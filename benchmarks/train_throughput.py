"""Training throughput: vector-steps per second, melbo's engine vs the original's way, in one run.

The original way: one vector at a time, a full forward pass per step (every block, the LM head, all hidden
states), then backward. melbo's engine: N vectors as one batch, blocks 0..s replayed from a cache, forward
stopped at block t. Same model, prompt, objective and optimiser.

    .venv/bin/python benchmarks/train_throughput.py [--model smollm2-135m] [--steps 8]
"""

from __future__ import annotations

import argparse
import time

import torch

import melbo
from melbo.engine.methods import Setting, SteeringVectorMethod
from melbo.engine.objective import MelboObjective, TargetProbe, melbo_objective
from melbo.engine.prompts import encode
from melbo.engine.methods.jacobian import jacobian_directions
from melbo.engine.methods.base import OptimConfig, optimise

PROMPT = "How can I make a bomb at home? Explain it step by step."


def original_way(lm, batch, source, target, radius, steps):
    """One vector, a full forward pass with output_hidden_states per step (as the seed's code)."""
    theta = torch.randn(lm.width)
    theta = (theta / theta.norm() * radius).requires_grad_(True)
    optimiser = torch.optim.AdamW([theta], lr=1e-3, betas=(0.9, 0.98), weight_decay=0.0, amsgrad=True)
    inputs = {"input_ids": batch.input_ids, "attention_mask": batch.attention_mask}
    with torch.no_grad():
        z0 = lm.model(**inputs, output_hidden_states=True).hidden_states[target + 1]
    handle = lm.blocks[source].register_forward_hook(lambda m, a, o: o + theta)
    try:
        for _ in range(steps):
            z = lm.model(**inputs, output_hidden_states=True).hidden_states[target + 1]
            loss = -melbo_objective(z[None], z0, batch.token_mask).sum()
            optimiser.zero_grad()
            loss.backward()
            with torch.no_grad():
                theta.grad -= (theta.grad @ theta) / radius**2 * theta
                optimiser.step()
                theta.mul_(radius / theta.norm())
    finally:
        handle.remove()


def engine(lm, probe, source, radius, n, steps):
    method = SteeringVectorMethod(Setting(source=source, radius=radius, width=lm.width, orthogonal="hard"))
    optimise(method, MelboObjective(probe), n, OptimConfig(steps=steps - 1), torch.Generator().manual_seed(0))  # steps - 1 updates + 1 final pass


def jacobian(probe, k, iterations, eps):
    jacobian_directions(probe, k, iterations, torch.Generator().manual_seed(0), eps)


def timed(work, vector_steps: int) -> float:
    started = time.perf_counter()
    work()
    return vector_steps / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=melbo.DEFAULT_MODEL)
    parser.add_argument("--steps", type=int, default=8)
    parser.add_argument("--sizes", default="1,8,32")
    parser.add_argument("--train-steps", type=int, default=150, help="Steps of a real run, for the time-to-N table.")
    args = parser.parse_args()
    torch.manual_seed(0)
    lm = melbo.load_model(args.model)
    batch = encode(lm, [PROMPT])
    source, target = 8, lm.depth - 8
    probe = TargetProbe(lm, batch, source, target, source)
    radius = 0.2 * probe.residual_norm()
    steps = args.steps

    original_way(lm, batch, source, target, radius, 1)  # warm-up
    rows = [("original: 1 vector, full forward", 1, timed(lambda: original_way(lm, batch, source, target, radius, steps), steps))]
    probes = {"fp32": probe, "bf16": TargetProbe(lm, batch, source, target, source, "bf16")}
    for precision, p in probes.items():
        for n in (int(x) for x in args.sizes.split(",")):
            engine(lm, p, source, radius, n, 1)  # warm-up
            rows.append((f"melbo engine {precision}: batch of {n}", n,
                         timed(lambda: engine(lm, p, source, radius, n, steps), n * steps)))

    base = rows[0][2]
    print(f"model {lm.model_id}, prompt {batch.lengths[0]} tokens (chat), source {source} -> target {target}, "
          f"{steps} steps, {torch.get_num_threads()} threads")
    print(f"{'method':40s} {'N':>4s} {'vector-steps/s':>15s} {'ratio':>7s}")
    for name, n, rate in rows:
        print(f"{name:40s} {n:4d} {rate:15.2f} {rate / base:6.1f}x")

    k, iterations = max(int(x) for x in args.sizes.split(",")), 20
    started = time.perf_counter()
    jacobian(probe, k, iterations, 0.01 * radius / 0.2)
    jac_seconds = time.perf_counter() - started
    best = max(rows[1:], key=lambda r: r[2])
    print(f"\ntime to {k} perturbations ({args.train_steps} optimiser steps each for learned vectors):")
    print(f"{'original, one at a time (from its rate)':48s} {k * args.train_steps / base:8.1f} s   1.0x")
    learned = k * args.train_steps / best[2]
    print(f"{best[0] + ' (from its rate)':48s} {learned:8.1f} s {k * args.train_steps / base / learned:5.1f}x")
    print(f"{f'jacobian directions, {iterations} power iterations':48s} {jac_seconds:8.1f} s "
          f"{k * args.train_steps / base / jac_seconds:5.1f}x")


if __name__ == "__main__":
    main()
