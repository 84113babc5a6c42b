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
from dataclasses import asdict
from collections import defaultdict
from pathlib import Path
from typing import Any, Optional

from melbo.errors import MelboError
from melbo.io.files import atomic_write, read_json
from melbo.numbers import fmt, format_cell
from melbo.positions import Positions
from melbo.io.plots import curves_figure, learned_vs_random_figure, png, sweep_figure
from melbo.judging.assess import Metrics, ScoreRow, Scores
from melbo.engine.generation import Completion
from melbo.io.runconfig import RunConfig
from melbo.engine.store import BENCH, CONFIG, LAYER_MAP, MONITOR_DIR, Run

REPORT = "report.html"
TEMPLATE = "report.html.j2"


# ------------------------------------------------------------------------------------------------ reading
def _read_optional_json(path: Path) -> Any:
    return read_json(path) if path.exists() else None


def _curves(run: Run) -> Optional[list[list[float]]]:
    curves = run.curves
    if curves is None or curves.ndim != 2 or curves.numel() == 0:
        return None
    return curves.float().tolist()


# ------------------------------------------------------------------------------------------------ content
def _calibrated(found: dict | None) -> str:
    """How a calibrated R was found (melbo.engine.calibrate), for the R row."""
    if not found:
        return ""
    return (f"; calibrated: non-linear/linear response ratio {fmt(found.get('ratio'))} (target "
            f"{fmt(found.get('fraction'))}) over {found.get('samples')} random directions")


def _settings(config: RunConfig) -> list[tuple[str, str]]:
    settings = config.settings
    rows = [("model", config.model.id or config.model.spec or "—")]
    if config.model.system is not None:
        rows.append(("system prompt", config.model.system))
    rows += [(f"{who} weights", _weights(record)) for who, record in (config.provenance or {}).items()
             if isinstance(record, dict) and record]
    rows += [
        ("method", config.method),
        ("source → target block", f"{config.source} → {config.target}"),
        ("R", f"{fmt(config.radius, 4)}  (= {fmt(config.radius_relative)} × median residual norm "
              f"{fmt(config.residual_norm, 4)})" + _calibrated(config.radius_calibration)),
        ("p, q", f"{fmt(settings.p)}, {fmt(settings.q)}"),
        ("perturbations", str(settings.n_vectors)),
        ("steps", str(settings.steps)),
        ("learning rate", fmt(settings.lr)),
        ("orthogonality", settings.orthogonal),
    ]
    if config.method == "adapters":
        rows.append(("adapter rank", str(settings.rank)))
    rows += [("positions", str(Positions.parse(settings.positions))),
             ("seed", str(settings.seed)), ("new tokens", str(settings.max_new_tokens))]
    if not config.complete:
        rows.append(("status", config.status))
    if config.created:
        rows.append(("created", config.created))
    return rows


def _weights(record: dict) -> str:
    """Where a model's weights came from, as config.json's provenance records it (what reproduces the run)."""
    digest = f"sha256 {str(record['sha256'])[:16]}…" if record.get("sha256") else "no content hash"
    if record.get("source") == "hub":
        commit = str(record.get("commit") or "unresolved")[:12]
        return f"hub {record.get('id')} @ {record.get('revision')} → commit {commit}, {digest}"
    where = f" {record['path']}" if record.get("path") else ""
    return f"{record.get('source', 'unknown')}{where}, {digest}"


def _group_by_prompt(rows: list[Completion], prompts: list[str]) -> list[dict]:
    by_prompt: dict[int, list[Completion]] = defaultdict(list)
    for r in rows:
        by_prompt[r.prompt_index].append(r)
    groups = []
    for p_index in sorted(by_prompt):
        items = sorted(by_prompt[p_index], key=lambda r: r.sample)
        prompt = items[0].prompt or (prompts[p_index] if p_index < len(prompts) else "")
        groups.append({"index": p_index, "prompt": prompt,
                       "texts": [{"text": r.text, "tokens": r.tokens, "sample": r.sample} for r in items]})
    return groups


def _metric_rows(score: Optional[ScoreRow]) -> list[tuple[str, str]]:
    if score is None:
        return []
    return [("distance from unsteered", fmt(score.distance_from_unsteered)),
            ("perplexity", fmt(score.perplexity)),
            ("repetition", fmt(score.repetition)),
            ("mean tokens", fmt(score.mean_tokens))]


def _summary(scores: Optional[Scores]) -> list[tuple[str, str]]:
    if scores is None:
        return []
    return [("diversity", fmt(scores.diversity)),
            ("mean distance from unsteered", fmt(scores.mean_distance_from_unsteered)),
            ("median perplexity", fmt(scores.median_perplexity)),
            ("mean repetition", fmt(scores.mean_repetition))]


def build_context(run_dir: Path, sweep_dir: Optional[Path] = None) -> dict:
    # A benchmark that compares several runs keeps them in subdirectories: its own directory holds only bench.json.
    # So does a layer map (melbo.jobs.layermap): its directory holds map.json, not a run's config.json.
    bench_only = not (run_dir / CONFIG).exists() and ((run_dir / BENCH).exists() or (run_dir / LAYER_MAP).exists())
    run = None if bench_only else Run.load(run_dir, result=False)
    config = run.config if run is not None else None
    prompts = config.prompts if config is not None else []
    completions = [Completion(**row) for row in run.completions()] if run is not None else []
    curves = _curves(run) if run is not None else None
    metrics = Metrics.load(run_dir)
    sweep = None
    if sweep_dir is not None:
        from melbo.io.sweepfile import SweepResult

        sweep = SweepResult.load(sweep_dir)

    learned = metrics.learned if metrics is not None else None
    random = metrics.random if metrics is not None else None
    score_by_vector = {p.vector: p for p in learned.steered} if learned is not None else {}
    unsteered_score = learned.unsteered if learned is not None else None

    steered: dict[int, list[Completion]] = defaultdict(list)
    unsteered: list[Completion] = []
    labels: dict[int, str] = {}
    for row in completions:
        if row.vector is None:
            unsteered.append(row)
        else:
            steered[row.vector].append(row)
            labels.setdefault(row.vector, row.label or f"v{row.vector}")

    n = max([len(curves) if curves else 0, *(v + 1 for v in steered), *(v + 1 for v in score_by_vector)], default=0)
    if n == 0 and config is not None and config.complete:
        n = config.settings.n_vectors
    cards = []
    for i in range(n):
        score = score_by_vector.get(i)
        curve = curves[i] if curves and i < len(curves) else None
        cards.append({
            "index": i,
            "label": labels.get(i) or (score.label if score is not None else f"v{i}"),
            "prompts": _group_by_prompt(steered.get(i, []), prompts),
            "metrics": _metric_rows(score),
            "cluster": score.cluster_name if score is not None else None,
            "no_change": bool(score is not None and score.no_change),
            "objective": fmt(curve[-1], 4) if curve else None,
        })
    anchor = {c["label"]: f"v{c['index']}" for c in cards}
    clusters = []
    for c in metrics.clusters if metrics is not None else []:
        members = [{"label": m, "anchor": anchor.get(m)} for m in c.members]
        clusters.append({"id": c.id, "name": c.name or f"cluster {c.id}", "no_change": c.no_change,
                         "members": members})

    random_rows: dict[str, list[Completion]] = defaultdict(list)
    for completion in metrics.random_completions if metrics is not None else []:
        random_rows[completion.label].append(completion)
    random_completions = [{"label": label, "prompts": _group_by_prompt(rows, prompts)}
                          for label, rows in random_rows.items()]

    sweep_ctx = None
    if sweep is not None:
        chosen = sweep.chosen
        sweep_ctx = {
            "plot": png(sweep_figure(sweep.to_dict())),
            "chosen": (f"{fmt(chosen.radius_relative)} × residual norm (R = {fmt(chosen.radius, 4)})"
                       if chosen is not None else None),
            "reason": sweep.reason,
            "several_layers": len({(p.source, p.target) for p in sweep.points}) > 1,
            "fluency_floor": fmt(sweep.fluency_floor) if sweep.fluency_floor is not None else None,
            "points": [{"r": fmt(p.radius_relative if sweep.relative else p.radius),
                        "radius": fmt(p.radius, 4), "relative": fmt(p.radius_relative),
                        "diversity": fmt(p.diversity), "ppl": fmt(p.median_perplexity),
                        "distance": fmt(p.mean_distance_from_unsteered), "repetition": fmt(p.mean_repetition),
                        "fluent": p.fluent, "layers": f"{p.source} → {p.target}", "chosen": p.at(chosen)}
                       for p in sweep.points],
        }
    return {
        "title": f"melbo report · {config.model.id if config is not None else run_dir.name}",
        "run_name": run_dir.name,
        "settings": _settings(config) if config is not None else [],
        "prompts": prompts,
        "unsteered": _group_by_prompt(unsteered, prompts),
        "unsteered_metrics": _metric_rows(unsteered_score),
        "cards": cards,
        "has_metrics": learned is not None,
        "learned_summary": _summary(learned),
        "random_summary": _summary(random),
        "clusters": clusters,
        "comparison_plot": png(learned_vs_random_figure(metrics.to_dict())) if metrics is not None else None,
        "curves_plot": png(curves_figure(curves)) if curves else None,
        "random_completions": random_completions,
        "sweep": sweep_ctx,
        "bench": _bench_context(run_dir),
        "layer_map": _layer_map_context(run_dir),
        "divergence": _divergence_context(run_dir),
        "monitor": _monitor_context(run_dir),
        "checks": _checks_context(run_dir),
        "version": config.melbo_version if config is not None else None,
    }


# ------------------------------------------------------------------------------------------------ audit mode
def _divergence_context(run_dir: Path) -> Optional[dict]:
    """divergence.json (written by `melbo diff`): paired completions, most divergent first."""
    from melbo.judging.divergence import Divergence

    doc = Divergence.load(run_dir)
    if doc is None:
        return None
    rows = [{"rank": "–" if r.rank is None else r.rank, "label": r.label, "kind": r.kind, "kl": fmt(r.kl),
             "distance": fmt(r.distance), "audited": r.audited, "reference": r.reference,
             "prompt_index": r.prompt_index} for r in doc.unsteered + doc.rows]
    return {"rows": rows, "kl_tokens": doc.kl_tokens}


def _checks_context(run_dir: Path) -> Optional[dict]:
    """checks.json (written with --check): learned against random per error pattern, then who shows one."""
    from melbo.judging.checkers import load_checks

    try:
        doc = load_checks(run_dir)
    except MelboError:
        return None  # a damaged checks file costs its section, not the report
    if doc is None:
        return None

    def cell(side) -> str:
        return f"{side.consistent}/{side.of} [{fmt(side.low)}, {fmt(side.high)}]" if side.of else "—"

    return {"checker": doc.checker,
            "summary": [{"pattern": r.pattern, "learned": cell(r.learned), "random": cell(r.random)}
                        for r in doc.summary],
            "shown": [{"label": p.label, "kind": p.kind, "patterns": ", ".join(p.consistent),
                       "example": next(iter(p.examples.values()), "")} for p in doc.perturbations if p.consistent][:64],
            "selected": [{**asdict(s), "random": "—" if s.random_rate is None else
                          f"{s.random_rate:.0%} of {s.random_of}"} for s in doc.selected or []]}


def _monitor_context(run_dir: Path) -> Optional[dict]:
    """monitor/monitor.json and monitor.jsonl (written by `melbo monitor`): the rule and the flagged inputs."""
    from melbo.judging.monitor import read_monitor

    found = read_monitor(run_dir / MONITOR_DIR)
    if found is None:
        return None
    summary, records = found
    flagged = sorted((r for r in records if r["flagged"]), key=lambda r: -r["score"])
    return {"summary": [(str(k), format_cell(v)) for k, v in summary.items()],
            "flagged": [{"index": r["index"], "score": fmt(r["score"]), "perturbation": r["perturbation"],
                         "input": r["input"]} for r in flagged[:200]]}


# ------------------------------------------------------------------------------------------------ layer map
def _layer_map_context(run_dir: Path, best: int = 20) -> Optional[dict]:
    """map.json, map.png and ranking.json (written by `melbo map`): the heatmap and the best pairs."""
    if not (run_dir / LAYER_MAP).is_file():
        return None
    import base64

    from melbo.io.runconfig import MapConfig

    doc = MapConfig.load(run_dir)

    heatmap = run_dir / "map.png"
    ranking = _read_optional_json(run_dir / "ranking.json")
    rows = [{"rank": r.get("rank"), "pair": f"{r.get('source')} → {r.get('target')}", "gain": fmt(r.get("gain")),
             "sigma": ", ".join(fmt(v) for v in r.get("singular_values") or [])}
            for r in (ranking if isinstance(ranking, list) else [])[:best] if isinstance(r, dict)]
    return {"plot": base64.b64encode(heatmap.read_bytes()).decode("ascii") if heatmap.is_file() else None,
            "rows": rows, "pairs": doc.pairs, "status": doc.status, "model": doc.model.id, "k": doc.settings.k,
            "iterations": doc.settings.iterations}


# ------------------------------------------------------------------------------------------------ benchmark


def _bench_context(run_dir: Path) -> Optional[dict]:
    """The tables of the run directory's bench.json (written by `melbo bench ...`), all cells as text."""
    if not (run_dir / BENCH).is_file():
        return None
    from melbo.io.benchfile import BenchResult

    doc = BenchResult.load(run_dir)
    tables = [{"title": t.title, "columns": t.columns, "rows": [[format_cell(c) for c in row] for row in t.rows]}
              for t in doc.tables]
    return {"title": doc.title or doc.bench or "benchmark",
            "settings": [(str(k), format_cell(v)) for k, v in doc.settings.items()],
            "tables": tables, "notes": doc.notes, "wall": fmt(doc.wall_seconds) if doc.wall_seconds else None}


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
    from melbo.records.auditfiles import AUDIT, FINDINGS, OBSERVATIONS, read_findings, read_observations, read_state
    from melbo.io.plots import audit_figure

    audit_dir = Path(audit_dir)
    state = read_state(read_json(audit_dir / AUDIT), audit_dir / AUDIT)
    data = read_findings(read_json(audit_dir / FINDINGS), audit_dir / FINDINGS)
    observations = [o.to_json() for o in read_observations(audit_dir / OBSERVATIONS)]
    calibration, plan, stages, settings = data["calibration"], data["plan"], state["stages"], data["settings"]
    findings = []
    for f in data["findings"]:
        view = json.loads(json.dumps(f))
        view["score"] = fmt(f["score"])
        view["parts"] = {k: fmt(v) for k, v in f["parts"].items()}
        view["n_perturbations"] = len(f["perturbations"])
        view["reference_text"] = f["example"]["reference_text"]
        findings.append(view)
    arms = [{**a, "radius": f"{calibration['relative'] * a['multiplier']:.3g}x",
             "seconds": fmt(stages[f"arm {a['name']}"]["seconds"] if f"arm {a['name']}" in stages else None)}
            for a in plan["arms"]]
    context = {
        "title": "melbo audit", "model": state["model"]["id"] or "",
        "reference": state["reference"]["id"] if state["reference"] else None,
        "prompts": settings["prompts"], "budget": f"{settings['budget']:.0f} s",
        "spent": f"{state['spent']:.0f} s", "random": settings["random_baseline"],
        "findings": findings, "candidates": data["candidates"],
        "plot": png(audit_figure(observations, data["findings"])),
        "calibrated": f"{calibration['relative']:.3g}x", "source": calibration["source"],
        "target": calibration["target"], "rate": fmt(plan["rate"]), "arms": arms,
        "stages": [(name, fmt(s["seconds"])) for name, s in stages.items()],
        "checks": _checks_context(audit_dir),
    }
    path = audit_dir / REPORT
    atomic_write(path, render(context, "audit.html.j2").encode("utf-8"))
    return path


def write_triggers_report(out: Path) -> Path:
    """Write `triggers.html` beside a triggers.json: per finding, the confirmed inputs and the ranking."""
    from melbo.records.auditfiles import TRIGGERS_JSON, read_triggers

    data = read_triggers(read_json(Path(out) / TRIGGERS_JSON), Path(out) / TRIGGERS_JSON)
    cost = data["cost"]
    passes = cost["scoring"]["forward_passes"] + cost["confirm"]["forward_passes"]
    context = {"title": "melbo triggers", "source": data["source"], "mode": data["mode"],
               "template": data["template"], "inputs": cost["inputs"], "seconds": fmt(cost["seconds"]),
               "passes": passes, "baseline": f"{cost['baseline_forward_passes']} forward passes",
               "findings": data["findings"]}
    path = Path(out) / "triggers.html"
    atomic_write(path, render(context, "triggers.html.j2").encode("utf-8"))
    return path
