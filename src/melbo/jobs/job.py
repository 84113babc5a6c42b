"""The main jobs, each one library call: (radius sweep) → discover → completions → assessment → report, and
the same against a reference model (`diff`: contrastive discovery → the divergence ranking → the checker).

    run = melbo.elicit(lm, ["How can I make a bomb?"], "runs/bomb", n_vectors=16, radius="auto")
    run = melbo.diff(lm, base, ["What is 4 + 6?"], "runs/audit", n_vectors=32)

`melbo.discover` is the training step alone; `elicit` is what `melbo discover` on the command line does. The
run directory ends up with completions.jsonl, metrics.json (learned against `random` random vectors of the
same radius; none with random=0) and report.html.

`progress` receives discover's training events ({"batch", "batches", "step", "steps", "objective", "n"}) and
stage events ({"stage": "sweep" | "radius" | "train" | "generate" | "assess" | "report", ...}) announcing each
step of the job; `on_batch(n)` is called as completions are generated.
"""

from __future__ import annotations

from pathlib import Path
from typing import Callable, Optional, Sequence

from torch import Tensor

from melbo.checks import check_count_bound
from melbo.judging.divergence import rank_run
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel
from melbo.engine.prompts import check_prompt_list
from melbo.engine.runner import Progress, default_run_dir, discover, resume, validate
from melbo.settings import DEFAULT_RANDOM, DEFAULTS, DIFF_RADIUS, DIFF_RANDOM, DiscoverConfig
from melbo.io.files import check_output_dir
from melbo.engine.store import Run

SWEEP_SETTINGS = ("p", "q", "lr", "orthogonal", "soft_weight", "positions", "precision")  # the sweep trains with these


def elicit(
    lm: LoadedModel,
    prompts: Sequence[str],
    out: str | Path | None = None,
    *,
    random: int = DEFAULT_RANDOM,
    previous: Optional[Tensor] = None,
    progress: Optional[Progress] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    check: Optional[str] = None,
    **settings,
) -> Run:
    """Train perturbations on `prompts`, generate with each, assess them against random ones, write the report.

    Settings are `DiscoverConfig` fields; `radius="auto"` first sweeps R beside the run (`<out>-sweep`) and
    trains at the Goldilocks radius. `previous`: vectors the new ones stay orthogonal to. `check`: a checker
    (`melbo.judging.checkers`, e.g. "arithmetic-cot") that reads every completion into checks.json.
    """
    check_random(random)
    _checker(check)
    cfg = DiscoverConfig.build(check_prompt_list(prompts), **settings)
    path = Path(out) if out is not None else default_run_dir(lm)
    check_output_dir(path)  # before minutes of sweeping
    sweep_dir = _auto_radius(lm, cfg, path, previous, progress) if _is_auto(cfg.radius) else None
    _announce(progress, "train", out=str(path))
    run = discover(lm, cfg, path, previous=previous, progress=progress)
    if sweep_dir is not None:
        run.config.radius_sweep = str(sweep_dir)
    return finish(run, lm, random=random, progress=progress, on_batch=on_batch, check=check)


def resume_job(path: str | Path, lm: LoadedModel, *, random: Optional[int] = None,
               progress: Optional[Progress] = None, on_batch: Optional[Callable[[int], None]] = None,
               check: Optional[str] = None) -> Run:
    """Continue an interrupted `elicit` (training, then whatever of the rest is missing).

    `random=None` assesses with the run's own recorded baseline size; `check=None` keeps the run's checker.
    """
    if random is not None:
        check_random(random)
    _checker(check)
    _announce(progress, "train", out=str(path))
    run = resume(path, lm, progress=progress)
    recorded = run.config.random if run.config.random is not None else DEFAULT_RANDOM
    return finish(run, lm, random=recorded if random is None else random, progress=progress, on_batch=on_batch,
                  check=check or run.config.check)


def finish(run: Run, lm: LoadedModel, *, random: int = DEFAULT_RANDOM, progress: Optional[Progress] = None,
           on_batch: Optional[Callable[[int], None]] = None, check: Optional[str] = None) -> Run:
    """The steps after training: completions on the training prompts, the assessment, the checker, report.html."""
    from melbo.judging.assess import assess_run, run_completions
    from melbo.records.report import write_report

    run.config.random = random  # so that a resumed job assesses as this one asked
    if check:
        run.config.check = check
    run.save_config()
    if not run.completions():
        _announce(progress, "generate", total=(len(run) + 1) * len(run.settings.prompts))
    run_completions(run, lm, on_batch=on_batch)
    if random:
        _announce(progress, "assess", random=random)
        assess_run(run, lm, random=random)
    if check:
        from melbo.judging.checkers import check_run

        _announce(progress, "check", checker=check)
        check_run(run.path, check)
    _announce(progress, "report")
    sweep = run.config.radius_sweep
    write_report(run.path, Path(sweep) if sweep else None)
    return run


def diff(
    audited: LoadedModel,
    reference: LoadedModel,
    prompts: Sequence[str],
    out: str | Path | None = None,
    *,
    random: int = DIFF_RANDOM,
    progress: Optional[Progress] = None,
    on_batch: Optional[Callable[[int], None]] = None,
    check: Optional[str] = None,
    **settings,
) -> Run:
    """`melbo.diff`: contrastive discovery on `prompts`, then paired generation and the divergence ranking
    (`melbo.judging.divergence`).

    Settings are `DiscoverConfig` fields (`contrast` picks the form, default "difference"; `radius` defaults to
    `settings.DIFF_RADIUS`, larger than discover's, for the reason given there); `random` random
    vectors of the run's norm are ranked beside the learned ones (0: none; adapter runs have none). `check`: a
    checker (`melbo.judging.checkers`) that reads every audited completion into checks.json.
    """
    check_random(random)
    _checker(check)
    if not isinstance(prompts, DiscoverConfig):
        settings.setdefault("radius", DIFF_RADIUS)
    run = discover(audited, prompts, out, reference=reference, progress=progress, record={"random": random},
                   **settings)
    return _rank(run, audited, reference, random, progress, on_batch, check)


def resume_diff(path: str | Path, audited: LoadedModel, reference: LoadedModel, *, random: Optional[int] = None,
                progress: Optional[Progress] = None, on_batch: Optional[Callable[[int], None]] = None,
                check: Optional[str] = None) -> Run:
    """Continue an interrupted `diff` run from its last finished batch, then rank it as `diff` does.

    `random` None: the count the run recorded (runs before it was recorded: DIFF_RANDOM)."""
    if random is not None:
        check_random(random)
    _checker(check)
    run = resume(path, audited, progress=progress, reference=reference)
    recorded = run.config.random if run.config.random is not None else DIFF_RANDOM
    return _rank(run, audited, reference, recorded if random is None else random, progress, on_batch,
                 check or run.config.check)


def _rank(run: Run, audited: LoadedModel, reference: LoadedModel, random: int, progress: Optional[Progress],
          on_batch: Optional[Callable[[int], None]], check: Optional[str]) -> Run:
    """A diff run's steps after training: the divergence ranking, then the checker over the audited completions."""
    rank_run(run, audited, reference, random=random, progress=progress, on_batch=on_batch)
    if check:
        from melbo.judging.checkers import check_run

        run.config.check = check  # a resumed diff checks as this one asked
        run.save_config()
        check_run(run.path, check)
    return run


def _auto_radius(lm: LoadedModel, cfg: DiscoverConfig, path: Path, previous: Optional[Tensor],
                 progress: Optional[Progress]) -> Path:
    """radius "auto": a small sweep beside the run picks the Goldilocks R, which the run then uses."""
    from melbo.jobs.sweep import goldilocks_radius

    if cfg.method != DEFAULTS.method:
        raise MelboError(f"--radius auto sweeps steering vectors: give --radius explicitly for method {cfg.method}")
    earlier = len(previous) if previous is not None else 0
    validate(lm, DiscoverConfig(**{**cfg.__dict__, "radius": "1x"}), earlier)  # fail before the sweep
    sweep_dir = path.with_name(path.name + "-sweep")
    _announce(progress, "sweep", out=str(sweep_dir))
    cfg.radius = goldilocks_radius(lm, cfg.prompts, out=sweep_dir, source=cfg.source, target=cfg.target,
                                   chat=cfg.chat, seed=cfg.seed, **{k: getattr(cfg, k) for k in SWEEP_SETTINGS})
    _announce(progress, "radius", radius=cfg.radius, out=str(sweep_dir))
    return sweep_dir


def _checker(check: Optional[str]) -> None:
    """Fail on a checker that cannot be loaded before minutes of training, not after."""
    if check is not None:
        from melbo.judging.checkers import get_checker

        get_checker(check)


def _is_auto(radius: str) -> bool:
    return str(radius).strip().lower() == "auto"


def check_random(random: int) -> None:
    """The size of the random baseline: a whole number ≥ 0."""
    if isinstance(random, bool) or not isinstance(random, int) or random < 0:
        raise MelboError(f"--random must be a whole number ≥ 0, got {random!r}")
    check_count_bound("random", random)


def _announce(progress: Optional[Progress], stage: str, **detail) -> None:
    if progress is not None:
        progress({"stage": stage, **detail})
