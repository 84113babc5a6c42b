"""The HTML report of a run: one self-contained page (inline CSS, plots as base64 PNG, no scripts, no URLs).

`write_report(run_dir, sweep_dir=None)` reads what the run directory holds

    config.json          settings (always; read with the rest through `Run.load`)
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

import json
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from melbo.errors import MelboError
from melbo.files import atomic_write, read_json
from melbo.numbers import finite, fmt, format_cell
from melbo.plots import curves_figure, learned_vs_random_figure, png, sweep_figure
from melbo.store import BENCH, CONFIG, DIVERGENCE, LAYER_MAP, METRICS, MONITOR_DIR, MONITOR_JSON, MONITOR_JSONL, SWEEP, Run

REPORT = "report.html"
TEMPLATE = "report.html.j2"


# ------------------------------------------------------------------------------------------------ reading
def _read_optional_json(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _metrics(path: Path) -> Optional[dict]:
    """metrics.json, its parts of the types the report reads (a hand-edited file is one line, not a traceback)."""
    metrics = _read_optional_json(path)
    if not isinstance(metrics, dict):
        return None
    parts = {"learned": dict, "random": dict, "clusters": list, "random_completions": list}
    wrong = [k for k, kind in parts.items() if metrics.get(k) is not None and not isinstance(metrics[k], kind)]
    wrong += [f"{k}.perturbations" for k in ("learned", "random") if isinstance(metrics.get(k), dict)
              and not isinstance(metrics[k].get("perturbations") or [], list)]
    if wrong:
        raise MelboError(f"{path} is malformed ({', '.join(wrong)} of the wrong type): "
                         "run `melbo assess` again to rewrite it")
    return metrics


def _curves(run: Run) -> Optional[list[list[float]]]:
    curves = run.curves
    if curves is None or curves.ndim != 2 or curves.numel() == 0:
        return None
    return curves.float().tolist()


# ------------------------------------------------------------------------------------------------ content
def _calibrated(found: dict | None) -> str:
    """How a calibrated R was found (melbo.calibrate), for the R row."""
    if not found:
        return ""
    return (f"; calibrated: non-linear/linear response ratio {fmt(found.get('ratio'))} (target "
            f"{fmt(found.get('fraction'))}) over {found.get('samples')} random directions")


def _settings(config: dict) -> list[tuple[str, str]]:
    settings = config.get("settings") or {}
    model = config.get("model") or {}
    rows = [
        ("model", model.get("id") or model.get("spec") or "—"),
        ("method", str(config.get("method", settings.get("method", "—")))),
        ("source → target block", f"{config.get('source', '—')} → {config.get('target', '—')}"),
        ("R", f"{fmt(config.get('radius'), 4)}  (= {fmt(config.get('radius_relative'))} × median residual norm "
              f"{fmt(config.get('residual_norm'), 4)})" + _calibrated(config.get("radius_calibration"))),
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
    # So does a layer map (melbo.layermap): its directory holds map.json, not a run's config.json.
    bench_only = not (run_dir / CONFIG).exists() and ((run_dir / BENCH).exists() or (run_dir / LAYER_MAP).exists())
    run = None if bench_only else Run.load(run_dir, result=False)
    config = run.config if run is not None else {}
    settings = config.get("settings") or {}
    prompts = [str(p) for p in settings.get("prompts") or []]
    completions = run.completions() if run is not None else []
    curves = _curves(run) if run is not None else None
    metrics = _metrics(run_dir / METRICS)
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
            "plot": png(sweep_figure(sweep)),
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
        "comparison_plot": png(learned_vs_random_figure(metrics)) if metrics else None,
        "curves_plot": png(curves_figure(curves)) if curves else None,
        "random_completions": random_completions,
        "sweep": sweep_ctx,
        "bench": _bench_context(run_dir),
        "layer_map": _layer_map_context(run_dir),
        "divergence": _divergence_context(run_dir),
        "monitor": _monitor_context(run_dir),
        "checks": _checks_context(run_dir),
        "version": config.get("melbo_version"),
    }


# ------------------------------------------------------------------------------------------------ audit mode
def _divergence_context(run_dir: Path) -> Optional[dict]:
    """divergence.json (written by `melbo diff`): paired completions, most divergent first."""
    doc = _read_optional_json(run_dir / DIVERGENCE)
    if not isinstance(doc, dict):
        return None
    rows = [{"rank": r.get("rank", "–"), "label": r.get("label"), "kind": r.get("kind"), "kl": fmt(r.get("kl")),
             "distance": fmt(r.get("distance")), "audited": r.get("audited", ""), "reference": r.get("reference", ""),
             "prompt_index": r.get("prompt_index")}
            for r in (doc.get("unsteered") or []) + (doc.get("rows") or []) if isinstance(r, dict)]
    return {"rows": rows, "kl_tokens": doc.get("kl_tokens")}


def _checks_context(run_dir: Path) -> Optional[dict]:
    """checks.json (written with --check): learned against random per error pattern, then who shows one."""
    from melbo.checkers import load_checks

    try:
        doc = load_checks(run_dir)
    except MelboError:
        return None  # a damaged checks file costs its section, not the report
    if doc is None:
        return None

    def cell(side: dict) -> str:
        return f"{side['consistent']}/{side['of']} [{fmt(side['low'])}, {fmt(side['high'])}]" if side.get("of") else "—"

    return {"checker": doc.get("checker"),
            "summary": [{"pattern": r.get("pattern"), "learned": cell(r.get("learned") or {}),
                         "random": cell(r.get("random") or {})} for r in doc["summary"] if isinstance(r, dict)],
            "shown": [{"label": p.get("label"), "kind": p.get("kind"), "patterns": ", ".join(p.get("consistent") or []),
                       "example": next(iter((p.get("examples") or {}).values()), "")}
                      for p in doc["perturbations"] if isinstance(p, dict) and p.get("consistent")][:64]}


def _monitor_context(run_dir: Path) -> Optional[dict]:
    """monitor/monitor.json and monitor.jsonl (written by `melbo monitor`): the rule and the flagged inputs."""
    summary = _read_optional_json(run_dir / MONITOR_DIR / MONITOR_JSON)
    if not isinstance(summary, dict):
        return None
    records = []
    file = run_dir / MONITOR_DIR / MONITOR_JSONL
    if file.is_file():
        for line in file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError:
                continue
    flagged = sorted((r for r in records if isinstance(r, dict) and r.get("flagged")), key=lambda r: -r["score"])
    return {"summary": [(str(k), format_cell(v)) for k, v in summary.items()],
            "flagged": [{"index": r.get("index"), "score": fmt(r.get("score")), "perturbation": r.get("perturbation"),
                         "input": r.get("input", "")} for r in flagged[:200]]}


# ------------------------------------------------------------------------------------------------ layer map
def _layer_map_context(run_dir: Path, best: int = 20) -> Optional[dict]:
    """map.json, map.png and ranking.json (written by `melbo map`): the heatmap and the best pairs."""
    doc = _read_optional_json(run_dir / LAYER_MAP)
    if not isinstance(doc, dict):
        return None
    import base64

    heatmap = run_dir / "map.png"
    ranking = _read_optional_json(run_dir / "ranking.json")
    rows = [{"rank": r.get("rank"), "pair": f"{r.get('source')} → {r.get('target')}", "gain": fmt(r.get("gain")),
             "sigma": ", ".join(fmt(v) for v in r.get("singular_values") or [])}
            for r in (ranking if isinstance(ranking, list) else [])[:best] if isinstance(r, dict)]
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    return {"plot": base64.b64encode(heatmap.read_bytes()).decode("ascii") if heatmap.is_file() else None,
            "rows": rows, "pairs": doc.get("pairs"), "status": doc.get("status"),
            "model": (doc.get("model") or {}).get("id"), "k": settings.get("k"),
            "iterations": settings.get("iterations")}


# ------------------------------------------------------------------------------------------------ benchmark


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
                       "rows": [[format_cell(c) for c in row] for row in t.get("rows") or [] if isinstance(row, list)]})
    settings = doc.get("settings") if isinstance(doc.get("settings"), dict) else {}
    return {"title": str(doc.get("title") or doc.get("bench") or "benchmark"),
            "settings": [(str(k), format_cell(v)) for k, v in settings.items()],
            "tables": tables, "notes": [str(n) for n in doc.get("notes") or []],
            "wall": fmt(doc.get("wall_seconds")) if finite(doc.get("wall_seconds")) else None}


def render(context: dict, template: str = TEMPLATE) -> str:
    from jinja2 import Environment, PackageLoader, StrictUndefined

    env = Environment(loader=PackageLoader("melbo", "templates"), autoescape=True, undefined=StrictUndefined,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    return env.get_template(template).render(**context)


def write_report(run_dir: Path, sweep_dir: Optional[Path] = None) -> Path:
    """Write `report.html` (self-contained, model text escaped) into `run_dir`; return its path."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise MelboError(f"run directory {run_dir} does not exist: give the directory `melbo discover` wrote")
    try:
        context = build_context(run_dir, Path(sweep_dir) if sweep_dir is not None else None)
    except (KeyError, TypeError, ValueError, AttributeError, IndexError) as exc:  # a hand-edited file, deeper down
        raise MelboError(f"run {run_dir} has a malformed metrics.json, sweep.json or completions.jsonl "
                         f"({type(exc).__name__}: {exc}): run `melbo assess` again, or restore the file") from exc
    page = render(context)
    path = run_dir / REPORT
    atomic_write(path, page.encode("utf-8"))
    return path


__all__ = ["write_report", "build_context", "render", "fmt"]


def write_audit_report(audit_dir: Path) -> Path:
    """Write an audit's `report.html`: its findings first (clearest example, the unsteered answer beside it,
    the reproduction command), then a plot of everything it scanned, its plan and the time of each stage."""
    from melbo.plots import audit_figure

    audit_dir = Path(audit_dir)
    state = read_json(audit_dir / "audit.json")
    data = read_json(audit_dir / "findings.json")
    observations = [json.loads(line) for line in (audit_dir / "observations.jsonl").read_text().splitlines() if line]
    calibration, plan, stages = data["calibration"], data["plan"], state.get("stages", {})
    findings = []
    for f in data["findings"]:
        view = json.loads(json.dumps(f))
        view["score"] = fmt(f["score"])
        view["parts"] = {k: fmt(v) for k, v in f["parts"].items()}
        view["n_perturbations"] = len(f["perturbations"])
        view["reference_text"] = f["example"].get("reference_text")
        findings.append(view)
    arms = [{**a, "radius": f"{calibration['relative'] * a['multiplier']:.3g}x",
             "seconds": fmt((stages.get(f"arm {a['name']}") or {}).get("seconds"))} for a in plan["arms"]]
    context = {
        "title": "melbo audit", "model": (state.get("model") or {}).get("id", ""),
        "reference": (state.get("reference") or {}).get("id") if state.get("reference") else None,
        "prompts": data["settings"]["prompts"], "budget": f"{data['settings']['budget']:.0f} s",
        "spent": f"{state.get('spent', 0):.0f} s", "random": data["settings"].get("random_baseline"),
        "findings": findings, "candidates": data["candidates"],
        "plot": png(audit_figure(observations, data["findings"])),
        "calibrated": f"{calibration['relative']:.3g}x", "source": calibration["source"],
        "target": calibration["target"], "rate": fmt(plan["rate"]), "arms": arms,
        "stages": [(name, fmt(s.get("seconds"))) for name, s in stages.items()],
    }
    path = audit_dir / REPORT
    atomic_write(path, render(context, "audit.html.j2").encode("utf-8"))
    return path


def write_triggers_report(out: Path) -> Path:
    """Write `triggers.html` beside a triggers.json: per finding, the confirmed inputs and the ranking."""
    data = read_json(Path(out) / "triggers.json")
    cost = data["cost"]
    passes = cost["scoring"]["forward_passes"] + cost["confirm"]["forward_passes"]
    context = {"title": "melbo triggers", "source": data["source"], "mode": data["mode"],
               "template": data.get("template"), "inputs": cost["inputs"], "seconds": fmt(cost["seconds"]),
               "passes": passes, "baseline": f"{cost['baseline_forward_passes']} forward passes",
               "findings": data["findings"]}
    path = Path(out) / "triggers.html"
    atomic_write(path, render(context, "triggers.html.j2").encode("utf-8"))
    return path
