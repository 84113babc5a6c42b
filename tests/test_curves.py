"""Backdoor recall curves: the curve of one run, averaging over runs with intervals, the grids, the plot."""

from __future__ import annotations

import pytest

from melbo.bench.curves import CurveSetting, average, curve, found_by_label, full_grid, one_at_a_time


def test_curve_is_cumulative_from_the_first_hit():
    rows = [{"label": "v0", "behaviours": []}, {"label": "v1", "behaviours": ["hate"]},
            {"label": "v2", "behaviours": ["cheese"]}, {"label": "v1", "behaviours": ["cheese"]},  # another prompt
            {"label": "v3", "behaviours": []}]
    found = found_by_label(rows)
    assert found["v1"] == {"hate", "cheese"}
    labels = ["v0", "v1", "v2", "v3"]
    assert curve(found, labels, "hate") == [False, True, True, True]
    assert curve(found, labels, "cheese") == [False, True, True, True]
    assert curve(found, labels, "other") == [False] * 4
    assert curve(found, ["v2", "v0"], "hate") == [False, False]


def test_average_gives_recall_per_k_with_wilson_intervals():
    runs = [[False, True, True, True], [False, False, False, True], [True, True, True, True]]
    curves = [{"setting": "a", "arm": "learned", "behaviour": "hate", "hits": h} for h in runs]
    curves += [{"setting": "a", "arm": "random", "behaviour": "hate", "hits": [False] * 4} for _ in runs]
    summary = {(s["arm"]): s for s in average(curves)}
    learned = summary["learned"]
    assert learned["runs"] == 3 and learned["k"] == [1, 2, 3, 4]
    assert learned["recall"] == pytest.approx([1 / 3, 2 / 3, 2 / 3, 1.0])
    assert all(lo <= r <= hi for lo, r, hi in zip(learned["low"], learned["recall"], learned["high"]))
    assert summary["random"]["recall"] == [0.0] * 4 and summary["random"]["high"][0] > 0
    assert average(curves, budgets=[2, 4, 8])[0]["k"] == [2, 4]  # budgets beyond the curve are dropped


def test_grids():
    small = one_at_a_time()
    assert small[0] == CurveSetting() and len(small) == len(set(small)) == 7
    assert {g.radius for g in small} == {"0.2x", "0.3x", "0.4x", "calibrate"}
    assert sum(g != CurveSetting() for g in small) == 6
    full = full_grid()
    assert len(full) == 4 * 2 * 2 * 2 and CurveSetting() in full
    assert len({g.slug for g in full}) == len(full) and all("/" not in g.slug for g in full)


def test_recall_figure_draws_a_panel_per_behaviour(tmp_path):
    from melbo.io.plots import png, recall_figure

    curves = [{"setting": s, "arm": arm, "behaviour": b, "hits": [False, True]}
              for s in ("x", "y") for arm in ("learned", "random") for b in ("cheese", "hate")]
    figure = recall_figure(average(curves))
    assert len(figure.axes) == 2 and png(figure)
    assert recall_figure([]) is None
