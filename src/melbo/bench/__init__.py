"""Reproducible benchmarks of the seed's experiments: each trains a discovery run and writes `bench.json` into it.

Every bench implements `melbo.bench.common.Bench` and is found by name with `get_bench`:

- `arithmetic`: capability discovery (vectors that make a direct-answer model reason step by step);
- `refusal`: red-teaming (anti-refusal vectors, against random vectors of the same norm);
- `backdoor`: planted behaviours found from clean prompts (recall, against random vectors);
- `diff`: audit mode (plain discovery vs contrastive discovery vs random);
- `monitor`: the anomaly monitor's quality on the testbed.

Settings (with the full-strength defaults) are in `melbo.bench.settings`; statistics in `melbo.stats`.
"""

__all__ = ["BENCH", "Bench", "BenchResult", "BenchTable", "bench_names", "get_bench", "print_result", "run_seeds"]


def __getattr__(name: str):
    """melbo.bench.common's names, loaded on first use: `melbo.bench.settings` (which the CLI reads for its
    defaults) must not pull torch in through this package."""
    if name in __all__:
        from melbo.bench import common

        return getattr(common, name)
    raise AttributeError(f"module 'melbo.bench' has no attribute {name!r}")
