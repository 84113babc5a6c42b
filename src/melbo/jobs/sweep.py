"""Finding the Goldilocks radius: large enough for diverse behaviours, small enough to stay fluent.

`sweep(lm, prompts, radii, out=DIR)` trains a few vectors per radius R (and per (source, target) pair, if
given) with `runner.discover` into DIR/<point>/, generates with them on the training prompts, scores the
completions (`evaluation.score`), and picks R: the diversity peak among the *fluent* points, those whose median
perplexity (under the unsteered model) stays under a fluency floor (default 4 × the unsteered completion's
perplexity). Diversity alone keeps rising into gibberish, so the floor is what makes a peak. When diversity
rises monotonically over the fluent points, or no point is fluent, "reason" says so. Writes DIR/sweep.json:

    {"relative": bool, "points": [{"radius", "radius_relative", "source", "target", "diversity",
      "median_perplexity", "mean_distance_from_unsteered", "mean_repetition", "fluent"}],
     "chosen": {"radius", "radius_relative", "source", "target"} or null, "reason": str, "fluency_floor": float}

and DIR/sweep.png (diversity and median perplexity against R, the floor dashed, the chosen R marked).
A point directory that already holds a finished run with completions is reused, so an interrupted sweep can
be re-run into the same DIR.
"""

from __future__ import annotations

import math
import os
import tempfile
from pathlib import Path
from typing import Callable, Optional, Sequence

from melbo.judging import evaluation
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel
from melbo.checks import check_finite
from melbo.engine.distributed import RayPool
from melbo.numbers import finite_or_none, fmt
from melbo.io.plots import save_figure, sweep_figure
from melbo.judging.assess import run_completions
from melbo.engine.runner import DiscoverConfig, discover, parse_radius, resume, validate
from melbo.io.files import check_output_dir, make_output_dir, write_json
from melbo.settings import FLUENCY_FACTOR, SWEEP_RADII, SWEEP_STEPS, SWEEP_TOKENS, SWEEP_VECTORS
from melbo.engine.store import Run
# sweep.json's reader lives with the storage formats; its names stay importable from here
from melbo.io.sweepfile import SWEEP, SWEEP_FIX, SweepChoice, SweepPoint, SweepResult  # noqa: F401

PLOT = "sweep.png"

Progress = Callable[[dict], None]


def parse_radii(radii: Sequence[str] | str) -> tuple[list[str], bool]:
    """Validate radius specs (all absolute or all relative); return them sorted by value, and whether relative."""
    specs = [s.strip() for s in (radii.split(",") if isinstance(radii, str) else radii) if str(s).strip()]
    if not specs:
        raise MelboError("no radii to sweep: give e.g. --radii 0.05x,0.1x,0.2x,0.3x,0.5x")
    parsed = [parse_radius(s) for s in specs]
    kinds = {relative for _, relative in parsed}
    if len(kinds) > 1:
        raise MelboError(f"radii {', '.join(specs)} mix absolute and relative values: use all 0.1x-style or all 4.0-style")
    if len({v for v, _ in parsed}) != len(parsed):
        raise MelboError(f"radii {', '.join(specs)} repeat a value: give each radius once")
    order = sorted(range(len(specs)), key=lambda i: parsed[i][0])
    return [specs[i] for i in order], kinds.pop()


def parse_layer_pairs(text: Optional[str]) -> Optional[list[tuple[int, int]]]:
    """'6:20,8:22' → [(6, 20), (8, 22)]."""
    if text is None or not text.strip():
        return None
    pairs = []
    for part in text.split(","):
        try:
            s, t = part.split(":")
            pairs.append((int(s), int(t)))
        except ValueError:
            raise MelboError(f"--pairs {text!r} is not a list of source:target pairs: use e.g. 6:20,8:22") from None
    return pairs


def sweep(
    lm: LoadedModel,
    prompts: Sequence[str],
    radii: Sequence[str] | str = SWEEP_RADII,
    *,
    n_vectors: int = SWEEP_VECTORS,
    steps: int = SWEEP_STEPS,
    source: Optional[int] = None,
    target: Optional[int] = None,
    layer_pairs: Optional[Sequence[tuple[int, int]]] = None,
    max_new_tokens: int = SWEEP_TOKENS,
    out: str | Path,
    progress: Optional[Progress] = None,
    fluency_factor: float = FLUENCY_FACTOR,
    fluency_floor: Optional[float] = None,
    chat: Optional[bool] = None,
    seed: int = 0,
    workers: Optional[int] = None,
    ray_address: Optional[str] = None,
    **settings,
) -> dict:
    """Train, generate and score at every radius (× layer pair); choose the Goldilocks R; write sweep.json/png.

    `workers` or `ray_address`: the points run on Ray actors (`melbo.engine.distributed`), with the same results.

    `fluency_floor` is an absolute perplexity bound; without it the floor is `fluency_factor` × the unsteered
    completion's perplexity. Other keyword arguments are `DiscoverConfig` settings (lr, p, q, orthogonal, …).
    `progress` receives {"stage": "train"|"generate"|"score", "point", "points", "radius", "source", "target"},
    training events merged in.
    """
    specs, relative = parse_radii(radii)
    check_floor(fluency_factor, fluency_floor)
    pairs = [tuple(p) for p in layer_pairs] if layer_pairs else [(source, target)]
    out = Path(out)
    check_output_dir(out)
    grid = [(spec, s, t) for s, t in pairs for spec in specs]
    for spec, s, t in grid:  # check every setting before any training
        lm_check = DiscoverConfig(prompts=list(prompts), n_vectors=n_vectors, steps=steps, source=s, target=t,
                                  radius=spec, chat=chat, seed=seed, max_new_tokens=max_new_tokens, **settings)
        validate(lm, lm_check)
    pool = None
    if workers is not None or ray_address is not None:
        pool = RayPool.check(workers, ray_address)  # fail fast, before the sweep directory is made
    make_output_dir(out)

    tasks = [{"prompts": list(prompts), "path": str(out / _point_name(spec, s, t, len(pairs) > 1)),
              "where": {"point": k, "points": len(grid), "radius": spec, "source": s, "target": t},
              "settings": dict(n_vectors=n_vectors, steps=steps, source=s, target=t, radius=spec, chat=chat,
                               seed=seed, max_new_tokens=max_new_tokens, **settings)}
             for k, (spec, s, t) in enumerate(grid)]
    if pool is None:
        scored = [run_point(lm, **task, progress=progress) for task in tasks]
    else:  # points finish in any order on the workers; each is kept at its grid index
        scored = [None] * len(tasks)

        def finished(result: dict) -> None:
            scored[result["where"]["point"]] = result
            if progress:
                progress({"stage": "done", **result["where"], "point": sum(r is not None for r in scored),
                          "worker": result["worker"]})

        pool.run(lm, point_task, tasks, finished)
    points = [r["point"] for r in scored]
    unsteered_ppl = [ppl for r in scored for ppl in r["unsteered_perplexities"]]
    result = decide(points, unsteered_ppl, relative, fluency_factor, fluency_floor)
    write_json(out / SWEEP, result)
    plot(result, out / PLOT)
    return result


def check_floor(fluency_factor: float, fluency_floor: Optional[float]) -> None:
    """Before any training: a NaN or infinite floor would make every point unfluent and sweep.json not JSON."""
    if check_finite("fluency_factor", fluency_factor) <= 0:
        raise MelboError(f"fluency-factor must be > 0, got {fluency_factor}")
    if fluency_floor is not None and check_finite("fluency_floor", fluency_floor) <= 0:
        raise MelboError(f"fluency-floor must be > 0, got {fluency_floor}")


def run_point(lm: LoadedModel, prompts: list[str], path: str, where: dict, settings: dict,
              progress: Optional[Progress] = None) -> dict:
    """One sweep point: train (or reuse) its run at `path`, generate, score (on a Ray worker: `point_task`).

    Returns {"where", "point" (sweep.json's entry), "unsteered_perplexities"}.
    """
    if progress:
        progress({"stage": "train", **where})
    run = _train_point(lm, prompts, Path(path), progress, where, **settings)
    if progress:
        progress({"stage": "generate", **where})
    completions = run_completions(run, lm)
    if progress:
        progress({"stage": "score", **where})
    scores = evaluation.score(lm, completions, chat=settings.get("chat"))
    return {"where": where, "point": _point(run, scores),
            "unsteered_perplexities": [p["perplexity"] for p in scores["perturbations"] if p["vector"] is None]}


def point_task(lm: LoadedModel, memo: dict, task: dict) -> dict:
    """One sweep point on a Ray worker (`RayPool.run`): `run_point`, and which worker ran it."""
    return {**run_point(lm, **task), "worker": os.getpid()}


def _point(run: Run, scores: dict) -> dict:
    keys = ("diversity", "median_perplexity", "mean_distance_from_unsteered", "mean_repetition")
    return {"radius": run.config.radius, "radius_relative": run.config.radius_relative,
            "source": run.config.source, "target": run.config.target,
            **{k: finite_or_none(scores[k]) for k in keys}}


def decide(points: list[dict], unsteered_perplexities: Sequence[float], relative: bool,
           fluency_factor: float = FLUENCY_FACTOR, fluency_floor: Optional[float] = None) -> dict:
    """sweep.json's content: the fluency floor, each point's fluency, and the Goldilocks choice with its reason.

    The floor is `fluency_floor`, or `fluency_factor` × the median unsteered perplexity.
    """
    reference = _finite_median(list(unsteered_perplexities))
    if fluency_floor is None:
        if reference is None:
            raise MelboError("the unsteered completion has no perplexity (empty completion): give --fluency-floor")
        floor = fluency_factor * reference
        floor_text = f"{fluency_factor:g} × unsteered perplexity {reference:.3g} = {floor:.3g}"
    else:
        floor = float(fluency_floor)
        floor_text = f"{floor:.3g} (given)"
    for p in points:
        p["fluent"] = p["median_perplexity"] is not None and p["median_perplexity"] <= floor
    chosen, reason = choose(points, floor_text, relative)
    return {"relative": relative, "points": points, "chosen": chosen, "reason": reason, "fluency_floor": floor}


def choose(points: list[dict], floor_text: str = "the floor", relative: bool = True) -> tuple[Optional[dict], str]:
    """The Goldilocks point: the highest diversity among fluent points (ties: the smaller R). Returns (chosen, reason).

    `points` need "radius", "radius_relative", "source", "target", "diversity", "median_perplexity", "fluent".
    """
    def r_of(p):
        return p["radius_relative"] if relative else p["radius"]

    def show(p):
        return f"{p['radius_relative']:.3g}x" if relative else f"{p['radius']:.4g}"

    fluent = [p for p in points if p["fluent"] and p["diversity"] is not None]
    if not fluent:
        best = min((p for p in points if p["median_perplexity"] is not None), key=lambda p: p["median_perplexity"],
                   default=None)
        least = f"; the least perplexed point, R = {show(best)}, has {best['median_perplexity']:.3g}" if best else ""
        return None, (f"no radius is fluent: every median perplexity is above the floor {floor_text}{least}. "
                      f"Try smaller radii or a higher floor.")
    top = max(fluent, key=lambda p: (p["diversity"], -r_of(p)))
    chosen = {k: top[k] for k in ("radius", "radius_relative", "source", "target")}
    same = sorted((p for p in points if (p["source"], p["target"]) == (top["source"], top["target"])), key=r_of)
    fluent_same = [p for p in same if p["fluent"] and p["diversity"] is not None]
    layers = f" (layers {top['source']}→{top['target']})" if len({(p["source"], p["target"]) for p in points}) > 1 else ""
    rising = all(a["diversity"] <= b["diversity"] for a, b in zip(fluent_same, fluent_same[1:]))
    beyond = [p for p in same if r_of(p) > r_of(top)]
    if len(fluent_same) == 1:
        return chosen, (f"only R = {show(top)}{layers} is fluent (floor {floor_text}): chosen by fluency, "
                        f"not by a diversity peak.")
    if not beyond:
        trend = ("diversity rises monotonically up to the largest R tried" if rising
                 else "diversity is highest at the largest R tried")
        return chosen, (f"{trend}, which is fluent: no peak found; R = {show(top)}{layers} is a lower bound, "
                        f"try larger radii.")
    if top is fluent_same[-1]:
        nxt = beyond[0]
        trend = ("diversity rises monotonically over the fluent radii: no peak inside the fluent range"
                 if rising else "diversity is highest at the largest fluent R")
        return chosen, (f"{trend}; chose the largest fluent R = {show(top)}{layers}, since the next, "
                        f"R = {show(nxt)}, is not fluent (median perplexity {fmt(nxt['median_perplexity'])}, floor "
                        f"{floor_text}).")
    return chosen, (f"diversity peaks at R = {show(top)}{layers} ({top['diversity']:.3g}) among the radii whose "
                    f"median perplexity stays under the floor {floor_text}.")


def goldilocks_radius(lm: LoadedModel, prompts: Sequence[str], **kw) -> str:
    """Run a sweep and return the chosen radius as `discover` takes it: "0.17x" when relative, "3.2" when absolute.

    Keyword arguments go to `sweep` (radii defaults to 0.05x…0.5x; out defaults to a temporary directory).
    Raises MelboError when no radius is fluent.
    """
    if kw.get("out") is None:
        kw["out"] = tempfile.mkdtemp(prefix="melbo-sweep-")
    result = sweep(lm, prompts, **kw)
    chosen = result["chosen"]
    if chosen is None:
        raise MelboError(f"--radius auto found no fluent radius ({result['reason']}): give --radius explicitly")
    return f"{chosen['radius_relative']:.3g}x" if result["relative"] else f"{chosen['radius']:.4g}"


def plot(result: dict, path: Path) -> None:
    """sweep.png: the report's sweep figure (diversity and median perplexity against R, floor, chosen R)."""
    figure = sweep_figure(result)
    if figure is not None:
        save_figure(figure, path)


def _point_name(spec: str, source: Optional[int], target: Optional[int], with_layers: bool) -> str:
    name = "r" + spec.strip().lower()
    return f"{name}_L{source}-{target}" if with_layers else name


def _train_point(lm, prompts, path: Path, progress, where: dict, **settings) -> Run:
    def relay(event: dict) -> None:
        if progress:
            progress({"stage": "train", **where, **event})

    if (path / "config.json").exists():
        run = Run.load(path, model=lm)
        if not _same_settings(run, prompts, settings):
            raise MelboError(f"{path} holds a run with other settings: remove it, or sweep into another --out")
        if run.config.complete:
            return run
        return resume(path, lm, progress=relay)  # an interrupted sweep: finish this point's run
    return discover(lm, list(prompts), path, progress=relay, **settings)


def _same_settings(run: Run, prompts, settings: dict) -> bool:
    stored = run.settings
    return stored.prompts == list(prompts) and all(getattr(stored, k, None) == v for k, v in settings.items())


def _finite_median(values: list[float]) -> Optional[float]:
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return None
    mid = len(finite) // 2
    return finite[mid] if len(finite) % 2 else (finite[mid - 1] + finite[mid]) / 2
