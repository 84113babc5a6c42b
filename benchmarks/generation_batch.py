"""Generation cost per row against the batch size: why prompts of one token length share batches.

One decoding step (key/value cache of a 29-token prompt) for R rows at once, fp32 and bf16 weights; prints the
seconds per step, the milliseconds per row-token and the ratio to the smallest batch, all from one run. On a CPU
a decoding step for a few rows reads every weight for little work, so rows are nearly free until the products
become compute-bound: `melbo.engine.generation.generate` therefore batches the rows of every prompt with the same token
count together (no padding, so greedy tokens are unchanged).

    .venv/bin/python benchmarks/generation_batch.py [--model qwen2.5-coder-0.5b] [--rows 8 33 65 130 260]

Measure on an idle machine: another busy process on these 2 cores changes every number.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from typing import NoReturn

import torch


def step_seconds(lm, rows: int, prompt_tokens: int, repeats: int) -> float:
    """Mean wall seconds of one cached decoding step for `rows` rows."""
    from melbo.engine.generation import forward_cached

    ids = torch.randint(0, 1000, (rows, prompt_tokens))
    with torch.no_grad():
        _, cache = forward_cached(lm, ids, None)  # the prompt, then timed single-token steps
        forward_cached(lm, ids[:, :1], cache)  # one untimed step (allocations)
        started = time.perf_counter()
        for _ in range(repeats):
            _, cache = forward_cached(lm, ids[:, :1], cache)
    return (time.perf_counter() - started) / repeats


def fail(message: str) -> NoReturn:
    """One line and exit 2, as melbo's CLI answers bad input."""
    print(f"generation_batch.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail  # argparse's own errors too: one line, not the usage block
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--rows", type=int, nargs="+", default=[8, 33, 65, 130, 260])
    parser.add_argument("--prompt-tokens", type=int, default=29)
    parser.add_argument("--repeats", type=int, default=4)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if min(args.rows + [args.prompt_tokens, args.repeats]) < 1:
        fail("--rows, --prompt-tokens and --repeats must be ≥ 1")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    from melbo.engine.models import load_model
    from melbo.threads import configure_threads

    from melbo.errors import MelboError

    try:
        configure_threads(args.threads)
        lm = load_model(args.model)
    except MelboError as exc:  # a wrong model or thread count: one line, as the CLI gives it
        fail(str(exc))
    table = Table(title=f"{args.model}: one decoding step, {torch.get_num_threads()} threads", title_justify="left")
    for col in ("weights", "rows", "s per step", "ms per row-token", f"vs {args.rows[0]} rows"):
        table.add_column(col)
    for dtype in (torch.float32, torch.bfloat16):
        lm.model.to(dtype)
        first = None
        for rows in args.rows:
            per_row = step_seconds(lm, rows, args.prompt_tokens, args.repeats) / rows
            first = first or per_row
            table.add_row(str(dtype).removeprefix("torch."), str(rows), f"{per_row * rows:.3f}",
                          f"{per_row * 1e3:.1f}", f"{first / per_row:.2f}× cheaper per row")
    Console(width=120).print(table)


if __name__ == "__main__":
    main()
