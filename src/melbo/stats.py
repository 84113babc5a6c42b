"""Statistics for the benchmarks, in one place: intervals for rates and means, and a paired test.

- `wilson(hits, n)`: the Wilson score interval of a rate. Unlike the normal ("Wald") interval it stays inside
  [0, 1] and is not zero-width at 0/n or n/n, which is where small benches often land.
- `bootstrap_mean(values)` / `bootstrap_difference(a, b)`: percentile bootstrap intervals of a mean and of a
  mean difference (paired when a and b are measured on the same items), seeded, so the same data and seed give
  the same interval.
- `mcnemar(x, y)`: the exact McNemar test for paired binary outcomes (steered vs unsteered on the same
  problems). Only the discordant pairs carry information: under "no difference" each of them goes either way with
  probability 1/2, so the two-sided p is a binomial tail.

Pure Python (stdlib only): the inputs are tens to hundreds of outcomes.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass
from statistics import NormalDist
from typing import Optional, Sequence

CONFIDENCE = 0.95  # every interval the benches report
BOOTSTRAP_RESAMPLES = 2000


def _z(confidence: float) -> float:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    return NormalDist().inv_cdf(0.5 + confidence / 2)


@dataclass(frozen=True)
class Estimate:
    """A point estimate with its interval; `n` is the number of items (problems, prompts, seeds) behind it."""

    value: Optional[float]
    low: Optional[float]
    high: Optional[float]
    n: int
    method: str

    def to_json(self) -> dict:
        return asdict(self)

    def text(self, digits: int = 2) -> str:
        """'0.42 [0.30, 0.55]', or '—' when there is nothing to estimate."""
        if self.value is None:
            return "—"
        if self.low is None or self.high is None:
            return f"{self.value:.{digits}f}"
        return f"{self.value:.{digits}f} [{self.low:.{digits}f}, {self.high:.{digits}f}]"


def wilson(hits: int, n: int, confidence: float = CONFIDENCE) -> Estimate:
    """The rate hits/n with its Wilson score interval (value None when n is 0)."""
    if n < 0 or hits < 0 or hits > n:
        raise ValueError(f"need 0 ≤ hits ≤ n, got {hits}/{n}")
    if n == 0:
        return Estimate(None, None, None, 0, "wilson")
    z = _z(confidence)
    p = hits / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z / (1 + z * z / n) * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n))
    # clamp: at 0/n and n/n the bound equals the estimate exactly, rounding must not put it outside
    return Estimate(p, max(0.0, min(p, centre - half)), min(1.0, max(p, centre + half)), n, "wilson")


def _percentiles(stats: list[float], confidence: float) -> tuple[float, float]:
    stats = sorted(stats)
    tail = (1 - confidence) / 2
    lo = stats[max(0, math.floor(tail * len(stats)))]
    hi = stats[min(len(stats) - 1, math.ceil((1 - tail) * len(stats)) - 1)]
    return lo, hi


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                   confidence: float = CONFIDENCE) -> Estimate:
    """The mean of `values` with a percentile bootstrap interval (None for no values; no interval for one)."""
    xs = [float(v) for v in values]
    if not xs:
        return Estimate(None, None, None, 0, "bootstrap")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return Estimate(mean, None, None, 1, "bootstrap")
    rng = random.Random(seed)
    means = [sum(rng.choices(xs, k=len(xs))) / len(xs) for _ in range(resamples)]
    lo, hi = _percentiles(means, confidence)
    return Estimate(mean, min(lo, mean), max(hi, mean), len(xs), "bootstrap")


def bootstrap_difference(a: Sequence[float], b: Sequence[float], *, paired: bool = True, seed: int = 0,
                         resamples: int = BOOTSTRAP_RESAMPLES, confidence: float = CONFIDENCE) -> Estimate:
    """mean(a) − mean(b) with a bootstrap interval; paired resamples items (a[i], b[i]) together."""
    if paired:
        if len(a) != len(b):
            raise ValueError(f"paired samples differ in length: {len(a)} and {len(b)}")
        estimate = bootstrap_mean([x - y for x, y in zip(a, b)], seed=seed, resamples=resamples,
                                  confidence=confidence)
        return Estimate(estimate.value, estimate.low, estimate.high, estimate.n, "paired bootstrap")
    if not a or not b:
        return Estimate(None, None, None, 0, "bootstrap")
    xs, ys = [float(v) for v in a], [float(v) for v in b]
    diff = sum(xs) / len(xs) - sum(ys) / len(ys)
    rng = random.Random(seed)
    diffs = [sum(rng.choices(xs, k=len(xs))) / len(xs) - sum(rng.choices(ys, k=len(ys))) / len(ys)
             for _ in range(resamples)]
    lo, hi = _percentiles(diffs, confidence)
    return Estimate(diff, min(lo, diff), max(hi, diff), min(len(xs), len(ys)), "bootstrap")


@dataclass(frozen=True)
class Paired:
    """Paired binary outcomes of x and y on the same n items, and the exact McNemar p-value."""

    n: int
    both: int
    only_x: int
    only_y: int
    neither: int
    p_value: float

    def to_json(self) -> dict:
        return asdict(self)


def mcnemar_p(only_x: int, only_y: int) -> float:
    """Two-sided exact McNemar p from the discordant counts: 2·P(Binomial(b + c, 1/2) ≤ min(b, c)), at most 1."""
    if only_x < 0 or only_y < 0:
        raise ValueError(f"discordant counts must be ≥ 0, got {only_x} and {only_y}")
    n = only_x + only_y
    if n == 0:
        return 1.0
    tail = sum(math.comb(n, i) for i in range(min(only_x, only_y) + 1)) / 2 ** n
    return min(1.0, 2 * tail)


def mcnemar(x: Sequence[bool], y: Sequence[bool]) -> Paired:
    """The exact McNemar test of two paired binary outcome lists (same items, same order)."""
    if len(x) != len(y):
        raise ValueError(f"paired outcomes differ in length: {len(x)} and {len(y)}")
    both = sum(1 for a, b in zip(x, y) if a and b)
    only_x = sum(1 for a, b in zip(x, y) if a and not b)
    only_y = sum(1 for a, b in zip(x, y) if b and not a)
    return Paired(len(x), both, only_x, only_y, len(x) - both - only_x - only_y, mcnemar_p(only_x, only_y))
