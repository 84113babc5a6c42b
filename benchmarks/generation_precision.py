"""Steered generation in bf16 against fp32: row-tokens per second, and how often the greedy text changes.

Every row of one `melbo.engine.generation.generate` call (unsteered, learned-scale random vectors at several radii, on a
few prompts) is generated twice, with `Sampling(precision="fp32")` and `Sampling(precision="bf16")` (a bf16 copy
of the model, weights cast once: `LoadedModel.at_precision`). Timed calls alternate between the two precisions so
that a change in the machine's load hits both alike; the table shows the best of the repeats. Agreement: the share
of rows whose text is the same, and the mean share of a row's tokens before the first difference.

    .venv/bin/python benchmarks/generation_precision.py [--model smollm2-135m] [--vectors 16] [--repeats 2]

Ratios only: another busy process on these 2 cores changes every absolute number. Pin it with `taskset -c 0` and
`--threads 1` when something else runs on the other core.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn

PROMPTS = [
    "Tell me a short story about a cat.",
    "How do I bake bread at home?",
    "What is the capital of France?",
    "Write a haiku about the sea.",
]


def fail(message: str) -> NoReturn:
    """One line and exit 2, as melbo's CLI answers bad input."""
    print(f"generation_precision.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def prefix_share(a: list[int], b: list[int]) -> float:
    """The share of the longer row's tokens before the first difference (1.0: identical)."""
    longest = max(len(a), len(b))
    if longest == 0:
        return 1.0
    same = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))
    return same / longest


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--vectors", type=int, default=16, help="random vectors per radius")
    parser.add_argument("--radii", type=float, nargs="+", default=[0.1, 0.2, 0.4], help="× the residual norm")
    parser.add_argument("--tokens", type=int, default=48)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--device", default="cpu", help="cpu or cuda[:N] (timers then wait for the GPU)")
    args = parser.parse_args()
    if min(args.vectors, args.tokens, args.batch_size, args.repeats) < 1 or min(args.radii) <= 0:
        fail("--vectors, --tokens, --batch-size and --repeats must be ≥ 1, --radii > 0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    import torch
    from rich.console import Console
    from rich.table import Table

    from melbo.engine.arithmetic import random_vectors
    from melbo.engine.generation import Sampling, generate
    from melbo.engine.intervention import SteeringVectors
    from melbo.engine.models import load_model
    from melbo.engine.objective import residual_norm
    from melbo.engine.prompts import encode
    from melbo.threads import configure_threads

    threads = configure_threads(args.threads)
    lm = load_model(args.model, device=args.device)

    def clock() -> float:  # CUDA kernels run asynchronously: time what has finished
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        return time.perf_counter()
    source = 8 if lm.depth > 16 else lm.depth // 3
    norm = residual_norm(lm, encode(lm, PROMPTS, None), source)
    vectors = SteeringVectors(torch.cat([random_vectors(args.vectors, lm.width, r * norm, source, seed=i).vectors
                                         for i, r in enumerate(args.radii)]), source)
    runs: dict[str, list] = {"fp32": [], "bf16": []}
    texts = {}
    for _ in range(args.repeats):
        for precision in runs:
            sampling = Sampling(max_new_tokens=args.tokens, batch_size=args.batch_size, precision=precision)
            started = clock()
            rows = generate(lm, vectors, PROMPTS, sampling=sampling)
            runs[precision].append(clock() - started)
            texts[precision] = rows
    row_tokens = sum(r.tokens for r in texts["fp32"])
    console = Console()
    table = Table(title=f"{args.model} on {args.device}: {len(texts['fp32'])} rows × ≤{args.tokens} tokens, {threads} thread(s), "
                        f"best of {args.repeats}")
    for column in ("precision", "seconds", "row-tokens/s", "× fp32"):
        table.add_column(column, justify="right")
    for precision, seconds in runs.items():
        tokens = sum(r.tokens for r in texts[precision])
        table.add_row(precision, f"{min(seconds):.1f}", f"{tokens / min(seconds):.0f}",
                      f"{min(runs['fp32']) / min(seconds) * tokens / row_tokens:.2f}")
    console.print(table)

    agree = Table(title="greedy agreement, bf16 against fp32 (per row of the same prompt and perturbation)")
    for column in ("rows", "same text", "mean prefix share"):
        agree.add_column(column, justify="right")
    tokenize = lm.tokenizer
    for name, keep in [("unsteered", lambda r: r.vector is None)] + [
            (f"{radius:g}x", lambda r, i=i: r.vector is not None and r.vector // args.vectors == i)
            for i, radius in enumerate(args.radii)]:
        pairs = [(a, b) for a, b in zip(texts["fp32"], texts["bf16"]) if keep(a)]
        same = sum(a.text == b.text for a, b in pairs)
        shares = [prefix_share(tokenize(a.text)["input_ids"], tokenize(b.text)["input_ids"]) for a, b in pairs]
        agree.add_row(f"{name}: {len(pairs)}", f"{same / len(pairs):.2f}", f"{sum(shares) / len(shares):.2f}")
    console.print(agree)


if __name__ == "__main__":
    main()
