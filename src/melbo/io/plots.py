"""Every plot melbo draws (the report's and the radius sweep's), as matplotlib figures without pyplot.

`png(figure)` encodes one for the self-contained report; `save_figure(figure, path)` writes it to a file.
"""

from __future__ import annotations

import base64
import io
import math
from collections import defaultdict
from typing import Any, Optional

from melbo.numbers import finite, fmt

LEARNED_COLOUR = "#2563eb"
RANDOM_COLOUR = "#9ca3af"
UNSTEERED_COLOUR = "#111827"
CHOSEN_COLOUR = "#dc2626"


# ------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)  # so that savefig works without pyplot
    return fig


def png(fig) -> Optional[str]:
    """The figure as base64 PNG (None for no figure)."""
    if fig is None:
        return None
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def save_figure(fig, path) -> None:
    """Write the figure as a PNG file atomically (a full disk is one line, and leaves no half-written file)."""
    from melbo.io.files import atomic_write

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    atomic_write(path, buffer.getvalue())


def _style(ax) -> None:
    ax.grid(True, color="#e5e7eb", linewidth=0.8)
    ax.set_axisbelow(True)
    for side in ("top", "right"):
        ax.spines[side].set_visible(False)


def _scores_points(scores: Optional[dict]) -> list[tuple[str, float, float]]:
    if not scores:
        return []
    points = []
    for p in scores.get("perturbations") or []:
        if p.get("vector") is None and str(p.get("label", "")).startswith("unsteered"):
            continue
        d, ppl = p.get("distance_from_unsteered"), p.get("perplexity")
        if finite(d) and finite(ppl) and ppl > 0:
            points.append((str(p.get("label", "")), float(d), float(ppl)))
    return points


def learned_vs_random_figure(metrics: dict) -> Optional[Any]:
    """Distance from unsteered against perplexity (learned vs random), and the set-level scores as bars."""
    learned, random = metrics.get("learned"), metrics.get("random")
    learned_pts, random_pts = _scores_points(learned), _scores_points(random)
    if not learned_pts and not random_pts:
        return None
    fig = _figure(10, 4.2)
    scatter, bars = fig.subplots(1, 2, width_ratios=[1.6, 1])
    _style(scatter)
    if random_pts:
        scatter.scatter([p[1] for p in random_pts], [p[2] for p in random_pts], s=36, c=RANDOM_COLOUR,
                        marker="s", label="random (matched norm)", alpha=0.8, edgecolors="none")
    if learned_pts:
        scatter.scatter([p[1] for p in learned_pts], [p[2] for p in learned_pts], s=44, c=LEARNED_COLOUR,
                        label="learned", alpha=0.9, edgecolors="white", linewidths=0.6)
        if len(learned_pts) <= 40:
            for label, d, ppl in learned_pts:
                scatter.annotate(label, (d, ppl), xytext=(4, 3), textcoords="offset points", fontsize=7,
                                 color="#1e3a8a")
    unsteered = [p for p in (learned or {}).get("perturbations") or [] if p.get("vector") is None]
    if unsteered and finite(unsteered[0].get("perplexity")) and unsteered[0]["perplexity"] > 0:
        scatter.axhline(unsteered[0]["perplexity"], color=UNSTEERED_COLOUR, linestyle=":", linewidth=1,
                        label="unsteered perplexity")
    all_ppl = [p[2] for p in learned_pts + random_pts]
    if all_ppl and max(all_ppl) / max(min(all_ppl), 1e-9) > 20:
        scatter.set_yscale("log")
    scatter.set_xlabel("distance from unsteered (cosine)")
    scatter.set_ylabel("perplexity under the unsteered model")
    scatter.set_title("each perturbation: how different vs how fluent", fontsize=10)
    scatter.legend(fontsize=8, frameon=False)

    _style(bars)
    names = [("diversity", "diversity"), ("mean_distance_from_unsteered", "distance from\nunsteered"),
             ("mean_repetition", "repetition")]
    width = 0.38
    xs = list(range(len(names)))
    for offset, scores, colour, label in ((-width / 2, learned, LEARNED_COLOUR, "learned"),
                                          (width / 2, random, RANDOM_COLOUR, "random")):
        if not scores:
            continue
        values = [scores.get(key) if finite(scores.get(key)) else 0.0 for key, _ in names]
        drawn = bars.bar([x + offset for x in xs], values, width, color=colour, label=label)
        bars.bar_label(drawn, labels=[fmt(scores.get(key), 2) for key, _ in names], fontsize=7, padding=2)
    bars.set_xticks(xs, [name for _, name in names], fontsize=8)
    bars.set_title("the set of perturbations", fontsize=10)
    bars.legend(fontsize=8, frameon=False)
    bars.margins(y=0.15)
    return fig


def curves_figure(curves: list[list[float]]) -> Optional[Any]:
    """Objective against optimiser step, one line per perturbation."""
    if not curves or not curves[0]:
        return None
    from matplotlib import colormaps

    fig = _figure(10, 3.8)
    ax = fig.subplots()
    _style(ax)
    cmap = colormaps["viridis"]
    n = len(curves)
    for i, row in enumerate(curves):
        ax.plot(range(len(row)), row, color=cmap(i / max(n - 1, 1) * 0.9), linewidth=1.2, label=f"v{i}")
    ax.set_xlabel("optimiser step")
    ax.set_ylabel("objective F(θ)")
    ax.set_title("training curves", fontsize=10)
    if n <= 20:
        ax.legend(fontsize=7, frameon=False, ncol=max(1, math.ceil(n / 10)), loc="center left",
                  bbox_to_anchor=(1.01, 0.5))
    return fig


def sweep_figure(sweep: dict) -> Optional[Any]:
    """Diversity (left) and median perplexity (right) against R, one line per (source, target) pair; the fluency
    floor dashed, points above it circled, the chosen R marked."""
    from matplotlib import colormaps

    relative = bool(sweep.get("relative", True))
    key = "radius_relative" if relative else "radius"
    points = sorted((p for p in sweep.get("points") or [] if isinstance(p, dict) and finite(p.get(key))),
                    key=lambda p: p[key])
    if not points:
        return None
    groups: dict[tuple, list[dict]] = defaultdict(list)
    for p in points:
        groups[(p.get("source"), p.get("target"))].append(p)
    several = len(groups) > 1
    cmap = colormaps["tab10"]
    fig = _figure(10, 3.8)
    left, right = fig.subplots(1, 2)
    for ax in (left, right):
        _style(ax)
        ax.set_xlabel("R (× median residual norm)" if relative else "R (absolute)")

    def series(group, name):
        return [p.get(name) if finite(p.get(name)) else float("nan") for p in group]

    for g, ((source, target), group) in enumerate(sorted(groups.items(), key=lambda kv: str(kv[0]))):
        colour = cmap(g % 10) if several else LEARNED_COLOUR
        tag = f" (blocks {source}→{target})" if several else ""
        xs = [p[key] for p in group]
        left.plot(xs, series(group, "diversity"), "-o", color=colour, markersize=5, label=f"diversity{tag}")
        if not several:
            left.plot(xs, series(group, "mean_distance_from_unsteered"), "--s", color="#0891b2", markersize=4,
                      label="distance from unsteered")
        ppl = series(group, "median_perplexity")
        right.plot(xs, ppl, "-^", color=colour if several else "#d97706", markersize=5,
                   label=f"median perplexity{tag}")
        bad = [(x, y) for x, y, p in zip(xs, ppl, group) if p.get("fluent") is False and math.isfinite(y)]
        if bad:
            right.scatter([x for x, _ in bad], [y for _, y in bad], s=110, facecolors="none",
                          edgecolors=CHOSEN_COLOUR, linewidths=1.2, zorder=3,
                          label="not fluent" if g == 0 else None)
    floor = sweep.get("fluency_floor")
    if finite(floor) and floor > 0:
        right.axhline(floor, color=UNSTEERED_COLOUR, linestyle=":", linewidth=1.2, label=f"fluency floor {fmt(floor)}")
    finite_ppl = [p["median_perplexity"] for p in points if finite(p.get("median_perplexity"))
                  and p["median_perplexity"] > 0] + ([floor] if finite(floor) and floor > 0 else [])
    if finite_ppl and max(finite_ppl) / min(finite_ppl) > 20:
        right.set_yscale("log")
    chosen = sweep.get("chosen")
    if isinstance(chosen, dict) and finite(chosen.get(key)):
        for ax in (left, right):
            ax.axvline(chosen[key], color=CHOSEN_COLOUR, linestyle="--", linewidth=1.2,
                       label=f"chosen R = {fmt(chosen[key])}")
    left.set_ylabel("cosine distance")
    left.set_title("diversity grows with R", fontsize=10)
    right.set_ylabel("median perplexity")
    right.set_title("fluency falls with R", fontsize=10)
    left.legend(fontsize=7, frameon=False)
    right.legend(fontsize=7, frameon=False)
    return fig


def layer_map_figure(gains, sources: list[int], targets: list[int]) -> Any:
    """Heatmap of a layer map's relative gain σ₁·‖h_s‖/‖h_t‖: sources down, targets across, source ≥ target blank."""
    import numpy as np

    values = np.asarray(gains, dtype=float)  # [S, T], NaN where source ≥ target
    fig = _figure(min(max(4.8, 2 + 0.45 * len(targets)), 12), min(max(3.2, 1.6 + 0.4 * len(sources)), 10))
    ax = fig.subplots()
    image = ax.imshow(np.ma.masked_invalid(values), cmap="viridis", aspect="auto", interpolation="nearest")
    ax.set_xticks(range(len(targets)), [str(t) for t in targets], fontsize=7)
    ax.set_yticks(range(len(sources)), [str(s) for s in sources], fontsize=7)
    ax.set_xlabel("target block")
    ax.set_ylabel("source block")
    ax.set_title("relative gain per token: σ₁/√n · ‖h_source‖ / ‖h_target‖", fontsize=10)
    fig.colorbar(image, ax=ax, shrink=0.85)
    return fig


def recall_figure(summary: list[dict]) -> Optional[Any]:
    """Backdoor recall against the number of perturbations read (`melbo.bench.curves.average`): one panel per
    behaviour, one colour per setting, learned solid and random dashed, the Wilson band over runs shaded."""
    behaviours = sorted({s["behaviour"] for s in summary})
    if not behaviours:
        return None
    settings = list(dict.fromkeys(s["setting"] for s in summary))
    fig = _figure(5.0 * len(behaviours), 3.6)
    axes = fig.subplots(1, len(behaviours), squeeze=False)[0]
    colours = [f"C{i % 10}" for i in range(len(settings))]
    for ax, behaviour in zip(axes, behaviours):
        for s in summary:
            if s["behaviour"] != behaviour:
                continue
            colour = colours[settings.index(s["setting"])]
            learned = s["arm"] == "learned"
            ax.plot(s["k"], s["recall"], color=colour, linestyle="-" if learned else "--", linewidth=1.6,
                    label=s["setting"] if learned else None)
            if learned:
                ax.fill_between(s["k"], s["low"], s["high"], color=colour, alpha=0.12, linewidth=0)
        ax.set_xscale("log", base=2)
        ax.set_ylim(-0.02, 1.02)
        ax.set_xlabel("perturbations read (k)")
        ax.set_ylabel("recall (fraction of runs)")
        ax.set_title(f"{behaviour} (dashed: random, same norm)", fontsize=9)
        _style(ax)
    axes[0].legend(fontsize=7, loc="upper left")
    return fig


def audit_figure(observations: list[dict], findings: list[dict]) -> Optional[Any]:
    """Every scanned completion: distance from the unsteered answer against perplexity (log), findings numbered."""
    points = [(o["distance"], o["perplexity"]) for o in observations
              if finite(o.get("distance")) and finite(o.get("perplexity")) and o["perplexity"] > 0]
    if not points:
        return None
    fig = _figure(7.5, 3.6)
    ax = fig.add_subplot()
    _style(ax)
    ax.scatter([p[0] for p in points], [p[1] for p in points], s=10, color="#9ca3af", alpha=0.6,
               label="steered completions (scan)")
    for f in findings:
        e = f.get("example") or {}
        if finite(e.get("distance")) and finite(e.get("perplexity")) and e["perplexity"] > 0:
            ax.scatter([e["distance"]], [e["perplexity"]], s=60, color="#2563eb", zorder=3)
            ax.annotate(str(f["rank"]), (e["distance"], e["perplexity"]), xytext=(4, 4), textcoords="offset points",
                        color="#1e3a8a", fontsize=9, weight="bold")
    ax.set_yscale("log")
    ax.set_xlabel("embedding distance from the unsteered completion")
    ax.set_ylabel("perplexity (unsteered model)")
    ax.set_title("what the audit scanned; findings' clearest examples numbered by rank", fontsize=10)
    ax.legend(loc="upper left", fontsize=8, frameon=False)
    return fig
