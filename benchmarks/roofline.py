"""Roofline: this machine's matmul throughput at the engine's shapes, and the fraction of it melbo's engine reaches.

1. Peak: the matrix products of one decoder block at the engine's row count (rows = vectors × prompt tokens, e.g.
   16 × 37 = 592 for SmolLM2: 592 × 576 × 1536 in the MLP), as in training: the forward products X·Wᵀ and the
   backward input-gradient products dY·W (no weight gradients: the weights are frozen). fp32 and bf16 (bf16
   tensors, no autocast), at 1 thread and at all the cores this process may use.
2. Work: FLOPs per vector-step from the model config: forward through blocks s+1..t (block s's output is
   replayed) and backward to block s's output, 2 FLOPs per multiply-add; the projections and the attention
   products (causal masks computed in full, as SDPA does); norms, activations and the optimiser are not counted.
3. Achieved: a measured vector-steps/s (--rate, e.g. from benchmarks/peers.py) or melbo's engine timed briefly
   (the optimiser steps of one melbo.discover batch, timed from its progress callback, after an untimed warm-up),
   as GFLOP/s and as a fraction of the peak of its precision at its thread count.

    .venv/bin/python benchmarks/roofline.py [--model smollm2-135m] [--vectors 16] [--rate 14.95 --rate-precision fp32]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import melbo
from melbo.engine.models import resolve_precision
from melbo.engine.prompts import prompt_tokens
from melbo.threads import allowed_cores, configure_threads, free_cores

PROMPT = "How can I make a bomb?"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def block_shapes(config) -> dict[str, tuple[int, int]]:
    """(in, out) of each projection of one decoder block, from a Hugging Face config."""
    d, h = config.hidden_size, config.intermediate_size
    heads = config.num_attention_heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    head_dim = getattr(config, "head_dim", None) or d // heads
    return {"q": (d, heads * head_dim), "k": (d, kv * head_dim), "v": (d, kv * head_dim), "o": (heads * head_dim, d),
            "gate": (d, h), "up": (d, h), "down": (h, d)}


def attention_flops_per_row(config, tokens: int) -> int:
    """Q·Kᵀ and A·V for one token row, all heads, against `tokens` keys (forward)."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    return 2 * 2 * heads * head_dim * tokens


def flops_per_vector_step(config, tokens: int, blocks: int) -> float:
    """Forward plus backward (input gradients only: twice the forward's products) of `blocks` blocks, one vector."""
    linear = sum(2 * i * o for i, o in block_shapes(config).values())  # per row, forward
    forward = blocks * tokens * (linear + attention_flops_per_row(config, tokens))
    return 2.0 * forward


def block_matmul_rate(shapes: dict[str, tuple[int, int]], rows: int, dtype: torch.dtype, threads: int,
                      seconds: float) -> float:
    """GFLOP/s of one block's forward and input-gradient products at `rows` rows, timed for about `seconds`."""
    torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)
    weights = [torch.randn(o, i, generator=g).to(dtype) * 0.02 for i, o in shapes.values()]
    inputs = [torch.randn(rows, i, generator=g).to(dtype) for i, _ in shapes.values()]
    grads = [torch.randn(rows, o, generator=g).to(dtype) for _, o in shapes.values()]
    flops = sum(2 * 2 * rows * i * o for i, o in shapes.values())

    def once():
        for w, x, dy in zip(weights, inputs, grads):
            F.linear(x, w)  # X·Wᵀ: [rows, in] → [rows, out]
            dy @ w  # dY·W: [rows, out] → [rows, in]

    once()  # warm-up: kernel selection, first allocations
    reps, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        once()
        reps += 1
    return reps * flops / (time.perf_counter() - started) / 1e9


def engine_rate(lm, precision: str, vectors: int, source: int, target: int, radius: float, steps: int) -> float:
    """melbo's training rate in vector-steps/s, timed between the first and last step callbacks of one discover
    batch (set-up and saving left out), after an untimed 1-step run at the same shapes (kernel set-up)."""
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        timed = lambda _: stamps.append(time.perf_counter())  # noqa: E731
        for name, k, progress in (("warm-up", 1, None), ("timed", steps, timed)):
            melbo.discover(lm, [PROMPT], Path(tmp) / name, n_vectors=vectors, source=source, target=target,
                           radius=str(radius), steps=k, batch_size=vectors, precision=precision, progress=progress)
    return vectors * steps / (stamps[-1] - stamps[0])  # steps + 1 callbacks enclose `steps` steps


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=melbo.DEFAULT_MODEL)
    parser.add_argument("--source", type=int, default=6)
    parser.add_argument("--target", type=int, default=24)
    parser.add_argument("--vectors", type=int, default=16, help="Vectors trained as one batch.")
    parser.add_argument("--tokens", type=int, default=None, help="Prompt tokens (default: the chat bomb prompt's).")
    parser.add_argument("--radius", type=float, default=30.0)
    parser.add_argument("--threads", type=int, default=None,
                        help="The engine's threads (default: melbo's auto; with --rate: all cores).")
    parser.add_argument("--peak-threads", default=None, help="Thread counts to measure peaks at (default 1,<cores>).")
    parser.add_argument("--seconds", type=float, default=1.5, help="Timing per peak measurement.")
    parser.add_argument("--rate", type=float, default=None, help="A measured vector-steps/s: skip timing the engine.")
    parser.add_argument("--rate-precision", default="fp32", choices=list(DTYPES), help="The precision --rate ran at.")
    parser.add_argument("--precisions", default="fp32,bf16", help="Precisions to time the engine at.")
    parser.add_argument("--steps", type=int, default=6, help="Optimiser steps the engine is timed over.")
    return parser.parse_args()


def main() -> None:
    a = parse_args()
    lm = melbo.load_model(a.model)
    config = lm.model.config
    tokens = a.tokens or len(prompt_tokens(lm, PROMPT, lm.chat_template is not None))
    rows = a.vectors * tokens
    blocks = a.target - a.source
    work = flops_per_vector_step(config, tokens, blocks)
    shapes = block_shapes(config)

    cores = len(allowed_cores())
    free = free_cores()  # before any work: a busy machine understates every number below
    peak_threads = sorted({int(x) for x in a.peak_threads.split(",")} if a.peak_threads else {1, cores})
    print(f"model {lm.model_id}: {blocks} blocks ({a.source + 1}..{a.target}) x {tokens} tokens; "
          f"rows = {a.vectors} vectors x {tokens} = {rows}; projections (in, out): "
          + ", ".join(f"{k} {i}x{o}" for k, (i, o) in shapes.items()))
    print(f"work per vector-step (forward + input-gradient backward): {work / 1e9:.2f} GFLOP")
    idle = "" if free == cores else " (NOT IDLE: the numbers understate)"
    print(f"cores: {cores} allowed, {free} free at the start{idle}\n")

    peaks: dict[tuple[str, int], float] = {}
    print(f"{'peak: one block, fwd + bwd products':38s} {'threads':>7s} {'GFLOP/s':>9s} {'vec-steps/s at peak':>20s}")
    for name, dtype in DTYPES.items():
        for n in peak_threads:
            peaks[name, n] = block_matmul_rate(shapes, rows, dtype, n, a.seconds)
            print(f"{name + f' at {rows} rows':38s} {n:7d} {peaks[name, n]:9.1f} {peaks[name, n] * 1e9 / work:20.2f}")

    measured = []  # (label, precision, rate)
    if a.rate is not None:
        engine_threads = a.threads or cores  # what the given rate ran at
        measured.append(("given --rate", a.rate_precision, a.rate))
    else:
        engine_threads = configure_threads(a.threads)
        for precision in a.precisions.split(","):
            resolved = resolve_precision(precision, lm.device)
            rate = engine_rate(lm, precision, a.vectors, a.source, a.target, a.radius, a.steps)
            measured.append((f"melbo engine {precision}", resolved, rate))

    print(f"\n{'achieved':24s} {'threads':>7s} {'vec-steps/s':>11s} {'GFLOP/s':>9s} {'of peak (same threads)':>23s} "
          f"{'of best peak':>13s}")
    for label, precision, rate in measured:
        achieved = rate * work / 1e9
        same = peaks.get((precision, engine_threads))
        best = max(v for (p, _), v in peaks.items() if p == precision)
        same_text = f"{achieved / same:22.0%}" if same else f"{'(not measured)':>22s}"
        print(f"{label:24s} {engine_threads:7d} {rate:11.2f} {achieved:9.1f} {same_text} {achieved / best:13.0%}")


if __name__ == "__main__":
    main()
