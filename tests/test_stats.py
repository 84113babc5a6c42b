"""melbo.stats against values computed by hand or published: Wilson intervals, exact McNemar, bootstrap."""

from __future__ import annotations

import pytest

from melbo.stats import bootstrap_difference, bootstrap_mean, mcnemar, mcnemar_p, wilson


@pytest.mark.parametrize("hits, n, low, high", [
    (0, 10, 0.0, 0.27753),      # z²/(n+z²) with z = 1.95996
    (5, 10, 0.23659, 0.76341),
    (10, 10, 0.72247, 1.0),
    (1, 1, 0.20654, 1.0),
    (81, 263, 0.2553, 0.3662),  # the worked example of Newcombe (1998), method 3
])
def test_wilson_known_values(hits, n, low, high):
    e = wilson(hits, n)
    assert e.value == pytest.approx(hits / n)
    assert e.low == pytest.approx(low, abs=1e-4) and e.high == pytest.approx(high, abs=1e-4)
    assert e.low <= e.value <= e.high and e.n == n


def test_wilson_edge_cases_and_width():
    assert wilson(0, 0).value is None and wilson(0, 0).text() == "—"
    assert wilson(3, 10).text() == "0.30 [0.11, 0.60]"
    assert wilson(30, 100).high - wilson(30, 100).low < wilson(3, 10).high - wilson(3, 10).low
    assert wilson(5, 10, confidence=0.99).low < wilson(5, 10).low
    with pytest.raises(ValueError):
        wilson(11, 10)


@pytest.mark.parametrize("only_x, only_y, p", [
    (1, 9, 22 / 1024),        # 2·(1 + 10)/2^10
    (2, 8, 112 / 1024),       # 2·(1 + 10 + 45)/2^10
    (0, 5, 2 / 32),
    (3, 3, 1.0),              # capped at 1
    (0, 0, 1.0),
])
def test_mcnemar_exact_known_values(only_x, only_y, p):
    assert mcnemar_p(only_x, only_y) == pytest.approx(p)
    assert mcnemar_p(only_y, only_x) == pytest.approx(p)


def test_mcnemar_counts_the_table():
    x = [True, True, False, False, True, False]
    y = [True, False, True, False, False, False]
    t = mcnemar(x, y)
    assert (t.n, t.both, t.only_x, t.only_y, t.neither) == (6, 1, 2, 1, 2)
    assert t.p_value == pytest.approx(mcnemar_p(2, 1)) == pytest.approx(1.0)
    with pytest.raises(ValueError):
        mcnemar([True], [True, False])


def test_bootstrap_is_deterministic_and_covers_the_mean():
    values = [0, 1, 1, 0, 1, 1, 1, 0, 1, 1]
    a, b = bootstrap_mean(values, seed=3), bootstrap_mean(values, seed=3)
    assert a == b and a.value == pytest.approx(0.7)
    assert a.low < 0.7 < a.high and 0.3 <= a.low and a.high <= 1.0
    spread = [0.1, 0.7, 0.3, 0.9, 0.4, 0.25, 0.65, 0.8]
    assert bootstrap_mean(spread, seed=1) == bootstrap_mean(spread, seed=1)
    assert bootstrap_mean(spread, seed=1) != bootstrap_mean(spread, seed=2)  # the seed is what fixes it
    assert bootstrap_mean([]).value is None
    one = bootstrap_mean([0.5])
    assert one.value == 0.5 and one.low is None and one.text() == "0.50"
    assert bootstrap_mean([2.0] * 5).low == bootstrap_mean([2.0] * 5).high == 2.0


def test_bootstrap_difference_paired_and_unpaired():
    a = [1, 1, 1, 0, 1, 1, 1, 1]
    b = [0, 0, 1, 0, 0, 0, 1, 0]
    d = bootstrap_difference(a, b, seed=0)
    assert d.value == pytest.approx(0.625) and d.low <= 0.625 <= d.high and d.low > 0
    u = bootstrap_difference(a, b, paired=False, seed=0)
    assert u.value == pytest.approx(0.625) and u.method == "bootstrap"
    with pytest.raises(ValueError):
        bootstrap_difference([1], [1, 2])
