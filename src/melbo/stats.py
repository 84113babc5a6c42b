"""Statistics for the benchmarks, in one place: intervals for rates and means, and a paired test.

- `wilson(hits, n)`: the Wilson score interval of a rate. Unlike the normal ("Wald") interval it stays inside
  [0, 1] and is not zero-width at 0/n or n/n, which is where small benches often land.
- `bootstrap_mean(values)` / `bootstrap_difference(a, b)`: percentile bootstrap intervals of a mean and of a
  mean difference (paired when a and b are measured on the same items), seeded, so the same data and seed give
  the same interval.
- `mcnemar(x, y)`: the exact McNemar test for paired binary outcomes (steered vs unsteered on the same
  problems). Only the discordant pairs carry information: under "no difference" each of them goes either way with
  probability 1/2, so the two-sided p is a binomial tail.

The arithmetic is scipy.stats' (`binomtest(...).proportion_ci(method="wilson")`, `bootstrap(method=
"percentile")`, `binomtest` for McNemar's binomial tail); this module fixes the conventions the benches share
(95%, seeded resamples, None where there is nothing to estimate) and the `Estimate` they report.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Optional, Sequence

import numpy as np
from scipy import stats

CONFIDENCE = 0.95  # every interval the benches report
BOOTSTRAP_RESAMPLES = 2000


def _check_confidence(confidence: float) -> None:
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")


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
    _check_confidence(confidence)
    if n == 0:
        return Estimate(None, None, None, 0, "wilson")
    p = hits / n
    ci = stats.binomtest(int(hits), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    # clamp: at 0/n and n/n the bound equals the estimate exactly, rounding must not put it outside
    return Estimate(p, max(0.0, min(p, float(ci.low))), min(1.0, max(p, float(ci.high))), n, "wilson")


def _percentile_interval(samples: tuple, statistic, seed: int, resamples: int, confidence: float,
                         paired: bool = False) -> tuple[float, float]:
    res = stats.bootstrap(samples, statistic, paired=paired, vectorized=True, n_resamples=resamples,
                          confidence_level=confidence, method="percentile", rng=np.random.default_rng(seed))
    return float(res.confidence_interval.low), float(res.confidence_interval.high)


def _mean_difference(x, y, axis=-1):
    return np.mean(x, axis=axis) - np.mean(y, axis=axis)


def bootstrap_mean(values: Sequence[float], *, seed: int = 0, resamples: int = BOOTSTRAP_RESAMPLES,
                   confidence: float = CONFIDENCE) -> Estimate:
    """The mean of `values` with a percentile bootstrap interval (None for no values; no interval for one)."""
    xs = [float(v) for v in values]
    if not xs:
        return Estimate(None, None, None, 0, "bootstrap")
    mean = sum(xs) / len(xs)
    if len(xs) == 1:
        return Estimate(mean, None, None, 1, "bootstrap")
    if min(xs) == max(xs):  # no spread: every resample has this mean (scipy would warn of a degenerate interval)
        return Estimate(mean, mean, mean, len(xs), "bootstrap")
    lo, hi = _percentile_interval((np.asarray(xs),), np.mean, seed, resamples, confidence)
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
    if len(xs) < 2 or len(ys) < 2 or (min(xs) == max(xs) and min(ys) == max(ys)):
        return Estimate(diff, diff, diff, min(len(xs), len(ys)), "bootstrap")
    lo, hi = _percentile_interval((np.asarray(xs), np.asarray(ys)), _mean_difference, seed, resamples, confidence)
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
    return min(1.0, float(stats.binomtest(min(only_x, only_y), n, 0.5).pvalue))


def mcnemar(x: Sequence[bool], y: Sequence[bool]) -> Paired:
    """The exact McNemar test of two paired binary outcome lists (same items, same order)."""
    if len(x) != len(y):
        raise ValueError(f"paired outcomes differ in length: {len(x)} and {len(y)}")
    both = sum(1 for a, b in zip(x, y) if a and b)
    only_x = sum(1 for a, b in zip(x, y) if a and not b)
    only_y = sum(1 for a, b in zip(x, y) if b and not a)
    return Paired(len(x), both, only_x, only_y, len(x) - both - only_x - only_y, mcnemar_p(only_x, only_y))
