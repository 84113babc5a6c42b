"""What streaming costs: `generation.stream_rows` (one forward per token, text decoded as it comes, as `melbo serve`
streams it) against `generation.generate_rows` (transformers' generate, the batch path) on the embedded SmolLM2.

Greedy, one chat prompt, N new tokens, rows = unsteered + steered (+ random): the columns of "try it live".
Each cell is the best of `--repeats` runs; tokens/s counts every row's tokens. Also checks the two give the same text.

    OMP_NUM_THREADS=1 .venv/bin/python benchmarks/serve_stream.py            # 32 tokens, rows 1, 2, 3, best of 2
"""

from __future__ import annotations

import argparse
import time

import torch

import melbo
from melbo.engine.generation import Sampling, generate_rows, stream_rows
from melbo.engine.intervention import SteeringVectors
from melbo.engine.prompts import prompt_tokens

PROMPT = "Tell me about the sea."


def best_time(work, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        work()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args()
    lm = melbo.load_model("smollm2-135m")
    ids = prompt_tokens(lm, PROMPT, True)
    vectors = SteeringVectors(torch.randn(2, lm.width, generator=torch.Generator().manual_seed(0)) * 20, 6)
    sampling = Sampling(max_new_tokens=args.tokens)
    print(f"SmolLM2-135M, {len(ids)}-token prompt, {args.tokens} new tokens, greedy, torch threads "
          f"{torch.get_num_threads()}, best of {args.repeats}")
    print(f"{'rows':>4} | {'generate tok/s':>14} | {'stream tok/s':>12} | {'stream / generate':>17} | same text")
    for rows in ([None], [None, 0], [None, 0, 1]):
        batch = generate_rows(lm, vectors, ids, rows, sampling)
        streamed = [""] * len(rows)
        for deltas in stream_rows(lm, vectors, ids, rows, sampling):
            streamed = [a + b for a, b in zip(streamed, deltas)]
        tokens = sum(n for _, n in batch)
        t_generate = best_time(lambda: generate_rows(lm, vectors, ids, rows, sampling), args.repeats)
        t_stream = best_time(lambda: list(stream_rows(lm, vectors, ids, rows, sampling)), args.repeats)
        same = streamed == [text for text, _ in batch]
        print(f"{len(rows):>4} | {tokens / t_generate:>14.1f} | {tokens / t_stream:>12.1f} | "
              f"{t_generate / t_stream:>17.2f} | {same}")


if __name__ == "__main__":
    main()
