"""Reproducible benchmarks of the seed's experiments: each trains a discovery run and writes `bench.json` into it.

- `melbo.bench.arithmetic`: capability discovery (vectors that make a direct-answer model reason step by step);
- `melbo.bench.refusal`: red-teaming (anti-refusal vectors, against random vectors of the same norm).
"""

from melbo.bench.common import BENCH, BenchResult, BenchTable, print_result

__all__ = ["BENCH", "BenchResult", "BenchTable", "print_result"]
