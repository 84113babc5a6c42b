"""The HTML report of a run: one self-contained page (inline CSS, plots as base64 PNG, no scripts, no URLs).

`write_report(run_dir, sweep_dir=None)` reads what the run directory holds

    config.json          settings (always)
    completions.jsonl    unsteered and steered completions per prompt
    curves.safetensors   objective per perturbation per step
    metrics.json         scores of the learned (and random) perturbations, clusters       (optional)
    bench.json           tables of a benchmark (`melbo bench ...`), shown as a "Benchmark" section (optional)

plus, when given, a sweep directory's `sweep.json` (diversity and fluency against R, the chosen R), and writes
`report.html` into the run directory. Every section without data is left out.

Model output is untrusted: the template is rendered with autoescaping on and never marks model text safe, so a
completion that contains markup shows as text.
"""

from __future__ import annotations

import base64
import io
import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from melbo.errors import MelboError
from melbo.store import (BENCH, COMPLETIONS, CONFIG, CURVES, METRICS, SWEEP, atomic_write, load_tensors, read_json,
                         read_text)

REPORT = "report.html"
TEMPLATE = "report.html.j2"

LEARNED_COLOUR = "#2563eb"
RANDOM_COLOUR = "#9ca3af"
UNSTEERED_COLOUR = "#111827"
CHOSEN_COLOUR = "#dc2626"


# ------------------------------------------------------------------------------------------------ reading
def _read_optional_json(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _read_completions(run_dir: Path) -> list[dict]:
    file = run_dir / COMPLETIONS
    if not file.exists():
        return []
    rows = []
    text = read_text(file, "completions file", "delete it and it will be generated again")
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError as exc:
            raise MelboError(f"{file} line {n} is corrupt ({exc.msg}): delete it and regenerate") from exc
    return rows


def _read_curves(run_dir: Path) -> Optional[list[list[float]]]:
    file = run_dir / CURVES
    if not file.exists():
        return None
    curves = load_tensors(file).get("curves")
    if curves is None or curves.ndim != 2 or curves.numel() == 0:
        return None
    return curves.float().tolist()


# ------------------------------------------------------------------------------------------------ formatting
def _finite(x: Any) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


def fmt(x: Any, digits: int = 3) -> str:
    """A number for a human: 3 significant digits, '—' for missing or not-a-number."""
    if not _finite(x):
        return "—"
    return f"{x:.{digits}g}"


# ------------------------------------------------------------------------------------------------ plots
def _figure(width: float, height: float):
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width, height), dpi=110, layout="constrained")
    return fig


def _png(fig) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


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
        if _finite(d) and _finite(ppl) and ppl > 0:
            points.append((str(p.get("label", "")), float(d), float(ppl)))
    return points


def learned_vs_random_plot(metrics: dict) -> Optional[str]:
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
    if unsteered and _finite(unsteered[0].get("perplexity")) and unsteered[0]["perplexity"] > 0:
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
        values = [scores.get(key) if _finite(scores.get(key)) else 0.0 for key, _ in names]
        drawn = bars.bar([x + offset for x in xs], values, width, color=colour, label=label)
        bars.bar_label(drawn, labels=[fmt(scores.get(key), 2) for key, _ in names], fontsize=7, padding=2)
    bars.set_xticks(xs, [name for _, name in names], fontsize=8)
    bars.set_title("the set of perturbations", fontsize=10)
    bars.legend(fontsize=8, frameon=False)
    bars.margins(y=0.15)
    return _png(fig)


def curves_plot(curves: list[list[float]]) -> Optional[str]:
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
    return _png(fig)


def sweep_plot(sweep: dict) -> Optional[str]:
    """Diversity (left) and median perplexity (right) against R, one line per (source, target) pair; the fluency
    floor dashed, points above it circled, the chosen R marked."""
    from matplotlib import colormaps

    relative = bool(sweep.get("relative", True))
    key = "radius_relative" if relative else "radius"
    points = sorted((p for p in sweep.get("points") or [] if isinstance(p, dict) and _finite(p.get(key))),
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
        ax.set_xlabel("R (× mean residual norm)" if relative else "R (absolute)")

    def series(group, name):
        return [p.get(name) if _finite(p.get(name)) else float("nan") for p in group]

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
    if _finite(floor) and floor > 0:
        right.axhline(floor, color=UNSTEERED_COLOUR, linestyle=":", linewidth=1.2, label=f"fluency floor {fmt(floor)}")
    finite_ppl = [p["median_perplexity"] for p in points if _finite(p.get("median_perplexity"))
                  and p["median_perplexity"] > 0] + ([floor] if _finite(floor) and floor > 0 else [])
    if finite_ppl and max(finite_ppl) / min(finite_ppl) > 20:
        right.set_yscale("log")
    chosen = sweep.get("chosen")
    if isinstance(chosen, dict) and _finite(chosen.get(key)):
        for ax in (left, right):
            ax.axvline(chosen[key], color=CHOSEN_COLOUR, linestyle="--", linewidth=1.2,
                       label=f"chosen R = {fmt(chosen[key])}")
    left.set_ylabel("cosine distance")
    left.set_title("diversity grows with R", fontsize=10)
    right.set_ylabel("median perplexity")
    right.set_title("fluency falls with R", fontsize=10)
    left.legend(fontsize=7, frameon=False)
    right.legend(fontsize=7, frameon=False)
    return _png(fig)


# ------------------------------------------------------------------------------------------------ content
def _settings(config: dict) -> list[tuple[str, str]]:
    settings = config.get("settings") or {}
    model = config.get("model") or {}
    rows = [
        ("model", model.get("id") or model.get("spec") or "—"),
        ("method", str(config.get("method", settings.get("method", "—")))),
        ("source → target block", f"{config.get('source', '—')} → {config.get('target', '—')}"),
        ("R", f"{fmt(config.get('radius'), 4)}  (= {fmt(config.get('radius_relative'))} × mean residual norm "
              f"{fmt(config.get('residual_norm'), 4)})"),
        ("p, q", f"{fmt(config.get('p'))}, {fmt(config.get('q'))}"),
        ("perturbations", str(settings.get("n_vectors", "—"))),
        ("steps", str(settings.get("steps", "—"))),
        ("learning rate", fmt(settings.get("lr"))),
        ("orthogonality", str(config.get("orthogonal", settings.get("orthogonal", "—")))),
    ]
    if config.get("rank") is not None:
        rows.append(("adapter rank", str(config["rank"])))
    for key, name in (("positions", "positions"), ("seed", "seed"), ("max_new_tokens", "new tokens")):
        if key in settings:
            value = settings[key]
            rows.append((name, value if isinstance(value, str) else json.dumps(value)))
    if config.get("status") and config["status"] != "complete":
        rows.append(("status", str(config["status"])))
    if config.get("created"):
        rows.append(("created", str(config["created"])))
    return rows


def _group_by_prompt(rows: list[dict], prompts: list[str]) -> list[dict]:
    by_prompt: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_prompt[int(r.get("prompt_index", 0))].append(r)
    groups = []
    for p_index in sorted(by_prompt):
        items = sorted(by_prompt[p_index], key=lambda r: r.get("sample", 0))
        prompt = items[0].get("prompt") or (prompts[p_index] if p_index < len(prompts) else "")
        groups.append({"index": p_index, "prompt": str(prompt),
                       "texts": [{"text": str(r.get("text", "")), "tokens": r.get("tokens"),
                                  "sample": r.get("sample", 0)} for r in items]})
    return groups


def _metric_rows(score: Optional[dict]) -> list[tuple[str, str]]:
    if not score:
        return []
    return [("distance from unsteered", fmt(score.get("distance_from_unsteered"))),
            ("perplexity", fmt(score.get("perplexity"))),
            ("repetition", fmt(score.get("repetition"))),
            ("mean tokens", fmt(score.get("mean_tokens")))]


def _summary(scores: Optional[dict]) -> list[tuple[str, str]]:
    if not scores:
        return []
    return [("diversity", fmt(scores.get("diversity"))),
            ("mean distance from unsteered", fmt(scores.get("mean_distance_from_unsteered"))),
            ("median perplexity", fmt(scores.get("median_perplexity"))),
            ("mean repetition", fmt(scores.get("mean_repetition")))]


def build_context(run_dir: Path, sweep_dir: Optional[Path] = None) -> dict:
    # A benchmark that compares several runs keeps them in subdirectories: its own directory holds only bench.json.
    bench_only = not (run_dir / CONFIG).exists() and (run_dir / BENCH).exists()
    config = {} if bench_only else read_json(run_dir / CONFIG)
    settings = config.get("settings") or {}
    prompts = [str(p) for p in settings.get("prompts") or []]
    completions = _read_completions(run_dir)
    curves = _read_curves(run_dir)
    metrics = _read_optional_json(run_dir / METRICS)
    metrics = metrics if isinstance(metrics, dict) else None
    sweep = None
    if sweep_dir is not None:
        sweep_file = Path(sweep_dir) / SWEEP if Path(sweep_dir).is_dir() else Path(sweep_dir)
        if not sweep_file.exists():
            raise MelboError(f"{sweep_dir} holds no {SWEEP}: give the directory the R sweep wrote")
        sweep = read_json(sweep_file)

    learned = (metrics or {}).get("learned") or None
    random = (metrics or {}).get("random") or None
    score_by_vector = {int(p["vector"]): p for p in (learned or {}).get("perturbations") or []
                       if p.get("vector") is not None}
    unsteered_score = next((p for p in (learned or {}).get("perturbations") or [] if p.get("vector") is None), None)

    steered: dict[int, list[dict]] = defaultdict(list)
    unsteered: list[dict] = []
    labels: dict[int, str] = {}
    for row in completions:
        if row.get("vector") is None:
            unsteered.append(row)
        else:
            v = int(row["vector"])
            steered[v].append(row)
            labels.setdefault(v, str(row.get("label") or f"v{v}"))

    n = max([len(curves) if curves else 0, *(v + 1 for v in steered), *(v + 1 for v in score_by_vector)], default=0)
    if n == 0 and config.get("status") == "complete":
        n = int(settings.get("n_vectors") or 0)
    cards = []
    for i in range(n):
        score = score_by_vector.get(i)
        curve = curves[i] if curves and i < len(curves) else None
        cards.append({
            "index": i,
            "label": labels.get(i) or (str(score["label"]) if score and score.get("label") else f"v{i}"),
            "prompts": _group_by_prompt(steered.get(i, []), prompts),
            "metrics": _metric_rows(score),
            "cluster": (score or {}).get("cluster_name"),
            "no_change": bool((score or {}).get("no_change")),
            "objective": fmt(curve[-1], 4) if curve else None,
        })
    anchor = {c["label"]: f"v{c['index']}" for c in cards}
    clusters = []
    for c in (metrics or {}).get("clusters") or []:
        members = [{"label": str(m), "anchor": anchor.get(str(m))} for m in c.get("members") or []]
        clusters.append({"id": c.get("id"), "name": str(c.get("name") or f"cluster {c.get('id')}"),
                         "no_change": bool(c.get("no_change")), "members": members})

    random_rows: dict[str, list[dict]] = defaultdict(list)
    for row in (metrics or {}).get("random_completions") or []:
        random_rows[str(row.get("label", "random"))].append(row)
    random_completions = [{"label": label, "prompts": _group_by_prompt(rows, prompts)}
                          for label, rows in random_rows.items()]

    model = config.get("model") or {}
    chosen = (sweep or {}).get("chosen")
    sweep_ctx = None
    if sweep is not None:
        relative = bool(sweep.get("relative", True))
        sweep_ctx = {
            "plot": sweep_plot(sweep),
            "chosen": (f"{fmt(chosen.get('radius_relative'))} × residual norm (R = {fmt(chosen.get('radius'), 4)})"
                       if isinstance(chosen, dict) else None),
            "reason": str(sweep.get("reason") or ""),
            "several_layers": len({(p.get("source"), p.get("target")) for p in sweep.get("points") or []}) > 1,
            "fluency_floor": fmt(sweep.get("fluency_floor")) if sweep.get("fluency_floor") is not None else None,
            "points": [{"r": fmt(p.get("radius_relative" if relative else "radius")),
                        "radius": fmt(p.get("radius"), 4), "relative": fmt(p.get("radius_relative")),
                        "diversity": fmt(p.get("diversity")), "ppl": fmt(p.get("median_perplexity")),
                        "distance": fmt(p.get("mean_distance_from_unsteered")),
                        "repetition": fmt(p.get("mean_repetition")),
                        "fluent": p.get("fluent"),
                        "layers": f"{p.get('source', '—')} → {p.get('target', '—')}",
                        "chosen": isinstance(chosen, dict) and all(p.get(k) == chosen.get(k) for k in
                                                                   ("radius", "source", "target") if k in chosen)}
                       for p in sweep.get("points") or []],
        }
    return {
        "title": f"melbo report · {model.get('id') or model.get('spec') or run_dir.name}",
        "run_name": run_dir.name,
        "settings": _settings(config),
        "prompts": prompts,
        "unsteered": _group_by_prompt(unsteered, prompts),
        "unsteered_metrics": _metric_rows(unsteered_score),
        "cards": cards,
        "has_metrics": learned is not None,
        "learned_summary": _summary(learned),
        "random_summary": _summary(random),
        "clusters": clusters,
        "comparison_plot": learned_vs_random_plot(metrics) if metrics else None,
        "curves_plot": curves_plot(curves) if curves else None,
        "random_completions": random_completions,
        "sweep": sweep_ctx,
        "bench": _bench_context(run_dir),
        "divergence": _divergence_context(run_dir),
        "monitor": _monitor_context(run_dir),
        "version": config.get("melbo_version"),
    }


# ------------------------------------------------------------------------------------------------ audit mode
def _divergence_context(run_dir: Path) -> Optional[dict]:
    """divergence.json (written by `melbo diff`): paired completions, most divergent first."""
    doc = _read_optional_json(run_dir / "divergence.json")
    if not isinstance(doc, dict):
        return None
    rows = [{"rank": r.get("rank", "–"), "label": r.get("label"), "kind": r.get("kind"), "kl": fmt(r.get("kl")),
             "distance": fmt(r.get("distance")), "audited": r.get("audited", ""), "reference": r.get("reference", ""),
             "prompt_index": r.get("prompt_index")}
            for r in (doc.get("unsteered") or []) + (doc.get("rows") or []) if isinstance(r, dict)]
    return {"rows": rows, "kl_tokens": doc.get("kl_tokens")}


def _monitor_context(run_dir: Path) -> Optional[dict]:
    """monitor/monitor.json and monitor.jsonl (written by `melbo monitor`): the rule and the flagged inputs."""
    summary = _read_optional_json(run_dir / "monitor" / "monitor.json")
    if not isinstance(summary, dict):
        return None
    records = []
    file = run_dir / "monitor" / "monitor.jsonl"
    if file.is_file():
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    flagged = sorted((r for r in records if isinstance(r, dict) and r.get("flagged")), key=lambda r: -r["score"])
    return {"summary": [(str(k), _bench_cell(v)) for k, v in summary.items()],
            "flagged": [{"index": r.get("index"), "score": fmt(r.get("score")), "perturbation": r.get("perturbation"),
                         "input": r.get("input", "")} for r in flagged[:200]]}


# ------------------------------------------------------------------------------------------------ benchmark

# Rendered with the page's autoescaping environment: every cell is text, never markup.
BENCH_SECTION = """<section id="benchmark">
  <h2>Benchmark: {{ bench.title }}</h2>
  {% if bench.settings %}
  <div class="panel"><dl class="settings two">
  {% for name, value in bench.settings %}<dt>{{ name }}</dt><dd>{{ value }}</dd>{% endfor %}
  </dl></div>
  {% endif %}
  {% for table in bench.tables %}
  <div class="panel" style="margin-top:10px">
    <h3>{{ table.title }}</h3>
    <table>
      <thead><tr>{% for col in table.columns %}<th>{{ col }}</th>{% endfor %}</tr></thead>
      <tbody>
      {% for row in table.rows %}<tr>{% for cell in row %}<td>{{ cell }}</td>{% endfor %}</tr>
      {% endfor %}
      </tbody>
    </table>
  </div>
  {% endfor %}
  {% if bench.notes or bench.wall %}
  <div class="panel small muted" style="margin-top:10px">
    {% for note in bench.notes %}<p style="margin:2px 0">{{ note }}</p>{% endfor %}
    {% if bench.wall %}<p style="margin:2px 0">wall time {{ bench.wall }} s</p>{% endif %}
  </div>
  {% endif %}
</section>
"""


def _bench_cell(value: Any) -> str:
    if value is None:
        return "—"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, float):
        return fmt(value)
    if isinstance(value, (list, dict)):
        return json.dumps(value)
    return str(value)


def _bench_context(run_dir: Path) -> Optional[dict]:
    """The tables of the run directory's bench.json (written by `melbo bench ...`), all cells as text."""
    doc = _read_optional_json(run_dir / BENCH)
    if not isinstance(doc, dict):
        return None
    tables = []
    for t in doc.get("tables") or []:
        if not isinstance(t, dict):
            continue
        tables.append({"title": str(t.get("title") or ""),
                       "columns": [str(c) for c in t.get("columns") or []],
                       "rows": [[_bench_cell(c) for c in row] for row in t.get("rows") or [] if isinstance(row, list)]})
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    return {"title": str(doc.get("title") or doc.get("bench") or "benchmark"),
            "settings": [(str(k), _bench_cell(v)) for k, v in settings.items()],
            "tables": tables, "notes": [str(n) for n in doc.get("notes") or []],
            "wall": fmt(doc.get("wall_seconds")) if _finite(doc.get("wall_seconds")) else None}


def render(context: dict) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("melbo", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    page = env.get_template(TEMPLATE).render(**context)
    bench = context.get("bench")
    if bench:
        section = env.from_string(BENCH_SECTION).render(bench=bench)
        marker = "<footer" if "<footer" in page else "</main>"
        page = page.replace(marker, section + marker, 1)
    return page


def write_report(run_dir: Path, sweep_dir: Optional[Path] = None) -> Path:
    """Write `report.html` (self-contained, model text escaped) into `run_dir`; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MelboError(f"run directory {run_dir} does not exist: give the directory `melbo discover` wrote")
    page = render(build_context(run_dir, Path(sweep_dir) if sweep_dir is not None else None))
    path = run_dir / REPORT
    atomic_write(path, page.encode("utf-8"))
    return path


__all__ = ["write_report", "build_context", "render", "fmt"]
