"""Audit mode: `melbo audit` (ranked findings), `melbo diff` (a fine-tune against its reference) and `melbo monitor`
(which inputs express it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape
from rich.table import Table

from melbo.cli.app import (
    BatchSizeOpt, BlocksOpt, ChatOpt, DeviceOpt, DtypeOpt, ModelOpt, NVectorsOpt, PositionsOpt, PromptsArg,
    PromptsFileOpt, RunOutOpt, SeedOpt, SourceOpt, StepsOpt, TargetOpt, ThreadsOpt, app, err, given, interruptible, load, out,
    parse_indices, parse_positions, read_prompts)
from melbo.cli.catalog import record
from melbo.cli.progress import AuditDisplay, JobDisplay
from melbo.cli.tables import print_divergence, print_findings
from melbo.errors import MelboError
from melbo.settings import AUDIT_BUDGET, AUDIT_TOKENS, DEFAULTS, DEFAULT_CONTRAST, DIFF_RADIUS, DIFF_RANDOM, MONITOR_ALPHA


@app.command("diff")
def diff_command(
    ctx: typer.Context,
    prompts: List[str] = PromptsArg,
    prompts_file: Optional[Path] = PromptsFileOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The audited model (embedded name, directory, .gguf, hub id)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Its reference: the base model or an earlier checkpoint."),
    contrast: str = typer.Option(DEFAULT_CONTRAST, help="difference (default), penalised, or kl (see melbo.contrastive)."),
    contrast_weight: float = typer.Option(DEFAULTS.contrast_weight, help="λ of the penalised form."),
    out_dir: Optional[Path] = RunOutOpt,
    resume_dir: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted diff run directory."),
    method: str = typer.Option(DEFAULTS.method, help="vectors or adapters."),
    n_vectors: int = NVectorsOpt,
    source: Optional[int] = SourceOpt,
    target: Optional[int] = TargetOpt,
    radius: str = typer.Option(DIFF_RADIUS, help="R: absolute (4.0) or relative to the source residual norm (e.g. 0.3x)."),
    steps: int = StepsOpt,
    orthogonal: str = typer.Option(DEFAULTS.orthogonal, help="hard (vectors only), soft or none."),
    positions: str = PositionsOpt,
    batch_size: int = BatchSizeOpt,
    seed: int = SeedOpt,
    chat: Optional[bool] = ChatOpt,
    max_new_tokens: int = typer.Option(DEFAULTS.max_new_tokens, help="Tokens to generate per completion, on each model."),
    random: int = typer.Option(DIFF_RANDOM, help="Random vectors of the same R ranked beside the learned ones (0: none)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Audit a fine-tune: perturbations that change it but not its reference, ranked by how differently they behave."""
    from melbo import divergence, runner
    from melbo.files import check_output_dir
    from melbo.store import Run

    started = time.perf_counter()
    if random < 0:
        raise MelboError(f"--random must be ≥ 0, got {random}")
    if out_dir is not None:
        check_output_dir(out_dir)  # before minutes of loading and training
    if resume_dir is not None:
        if fixed := given(ctx, _DIFF_RESUME_KEEPS):
            raise MelboError(f"{', '.join(fixed)} cannot change on --resume (the run keeps its recorded settings): "
                             "drop them")
        config = Run.load(resume_dir).config
        if not config.get("reference"):
            raise MelboError(f"{resume_dir} is not a diff run: resume it with `melbo discover --resume {resume_dir}`")
        lm = load(model or config["model"]["spec"], device, dtype, blocks_path, threads)
        ref = load(reference or config["reference"]["spec"], device, dtype, blocks_path, threads)
        with JobDisplay() as display:
            run = interruptible(lambda: divergence.resume_diff(resume_dir, lm, ref, random=random,
                                                               progress=display.event, on_batch=display.advance),
                                resume_dir)
    else:
        if reference is None:
            raise MelboError("diff compares two models: give the reference with --reference (e.g. the base model)")
        texts = read_prompts(prompts or [], prompts_file)
        lm = load(model, device, dtype, blocks_path, threads)
        ref = load(reference, device, dtype, blocks_path, threads)
        settings = runner.DiscoverConfig(
            prompts=texts, method=method, n_vectors=n_vectors, source=source, target=target, radius=radius,
            steps=steps, orthogonal=orthogonal, positions=parse_positions(positions), batch_size=batch_size,
            seed=seed, chat=chat, max_new_tokens=max_new_tokens, contrast=contrast, contrast_weight=contrast_weight)
        path = out_dir or runner.default_run_dir(lm)
        with JobDisplay() as display:
            run = interruptible(lambda: divergence.diff(lm, ref, settings, path, random=random,
                                                        progress=display.event, on_batch=display.advance), path)
    print_divergence(divergence.load_divergence(run.path))
    from melbo.report import write_report

    report_path = write_report(run.path)
    out.print(f"run written to [bold]{escape(str(run.path))}[/] in {time.perf_counter() - started:.0f} s; "
              f"report: [bold]{escape(str(report_path))}[/]")
    record(run.path)  # into the catalogue (melbo catalog); trouble there is one warning line, never a failure


_DIFF_RESUME_KEEPS = ("prompts", "prompts_file", "out_dir", "contrast", "contrast_weight", "method", "n_vectors",
                      "source", "target", "radius", "steps", "orthogonal", "positions", "batch_size", "seed", "chat",
                      "max_new_tokens")


@app.command("monitor")
def monitor_command(
    run_dir: Path = typer.Argument(..., help="A finished run directory (discover or diff)."),
    prompts_file: Path = typer.Option(..., "--prompts-file", help="The inputs to watch, one per line."),
    clean: Optional[Path] = typer.Option(None, "--clean", help="Known-clean inputs to calibrate on (default: the inputs themselves)."),
    alpha: float = typer.Option(MONITOR_ALPHA, help="Target false-positive rate of the decision rule."),
    signal: str = typer.Option("target", help="Where to read the input's state: target or source block."),
    vectors: Optional[str] = typer.Option(None, help="Watch only these perturbations (comma-separated; default all)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write monitor.jsonl / monitor.json (default RUN/monitor)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Flag inputs whose activations express a discovered perturbation (calibrated on clean inputs)."""
    from melbo.files import check_output_dir
    from melbo.monitor import Monitor, write_monitor
    from melbo.store import MONITOR_DIR, Run

    run = Run.load(run_dir)
    destination = out_dir or run.path / MONITOR_DIR
    check_output_dir(destination)  # before the model loads: nothing computed is then lost
    inputs = read_prompts([], prompts_file)
    calibration = read_prompts([], clean) if clean is not None else inputs
    lm = load(model or run.config["model"]["spec"], device, dtype, blocks_path, threads)
    with err.status("calibrating on clean inputs …"):
        monitor = Monitor.calibrate(run, lm, calibration, signal=signal, alpha=alpha, self_calibrated=clean is None,
                                    indices=parse_indices(vectors))
    with err.status(f"scoring {len(inputs)} inputs …"):
        records = monitor.score(lm, inputs)
    path = write_monitor(destination, monitor, records)
    if out_dir is None:  # the report lives in the run; with --out elsewhere nothing outside it is touched
        from melbo.report import write_report

        write_report(run.path)
    table = Table(header_style="bold", expand=True, title_justify="left",
                  title=f"inputs flagged (score > {monitor.threshold:.3g}, α = {alpha})")
    for col in ("#", "score", "perturbation", "input"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col == "input" else None)
    flagged = sorted((r for r in records if r["flagged"]), key=lambda r: -r["score"])
    for r in flagged[:30]:
        table.add_row(str(r["index"]), f"{r['score']:.2f}", r["perturbation"], escape(" ".join(r["input"].split())))
    out.print(table)
    loo = monitor.calibration["false_positive_rate_loo"]
    out.print(f"{len(flagged)} of {len(records)} inputs flagged; false-positive rate on the clean set "
              f"(leave-one-out) {loo:.1%}; written to [bold]{escape(str(path))}[/]")


@app.command("audit")
def audit_command(
    prompts: List[str] = PromptsArg,
    prompts_file: Optional[Path] = PromptsFileOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The audited model (embedded name, directory, .gguf, hub id)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Its reference (base model): adds contrastive vectors and ranks by KL."),
    budget: str = typer.Option(AUDIT_BUDGET, help="Wall-clock budget of the whole audit, e.g. 15m, 900s, 1h."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Audit directory (default: runs/<time>-<model>-audit)."),
    resume_dir: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted audit directory."),
    seed: int = SeedOpt,
    chat: Optional[bool] = ChatOpt,
    max_new_tokens: int = typer.Option(AUDIT_TOKENS, help="Tokens per scan completion (confirmation generates 1.5×)."),
    random_baseline: bool = typer.Option(False, "--random-baseline", help="The control: random vectors of the same radii in place of every trained perturbation."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Ranked findings without choosing R: DCT, learned vectors on a ladder of radii (and diff against a reference),
    grouped into behaviours, confirmed on new prompts, within a time budget."""
    from melbo import audit as audit_job
    from melbo.files import check_output_dir
    from melbo.runner import default_run_dir

    started = time.perf_counter()
    display = AuditDisplay()
    if resume_dir is not None:
        state = audit_job.load_state(resume_dir)
        lm = load(model or state["model"]["spec"], device, dtype, blocks_path, threads)
        ref_spec = reference or (state["reference"] or {}).get("spec")
        ref = load(ref_spec, device, dtype, blocks_path, threads) if ref_spec else None
        with display:
            result = interruptible(lambda: audit_job.resume(resume_dir, lm, reference=ref, progress=display.event,
                                                            on_batch=display.advance), resume_dir, "audit")
    else:
        audit_job.parse_budget(budget)  # a bad budget fails before the model loads
        if out_dir is not None:
            check_output_dir(out_dir)
        texts = read_prompts(prompts or [], prompts_file)
        lm = load(model, device, dtype, blocks_path, threads)
        ref = load(reference, device, dtype, blocks_path, threads) if reference else None
        path = out_dir or default_run_dir(lm).with_name(default_run_dir(lm).name + "-audit")
        with display:
            result = interruptible(lambda: audit_job.audit(
                lm, texts, path, reference=ref, budget=budget, seed=seed, chat=chat, max_new_tokens=max_new_tokens,
                random_baseline=random_baseline, progress=display.event, on_batch=display.advance), path, "audit")
    print_findings(result.findings, len(result.candidates))
    record(result.path / "runs")  # every arm's run into the catalogue: `melbo catalog search` finds the findings' text
    out.print(f"audit written to [bold]{escape(str(result.path))}[/] in {time.perf_counter() - started:.0f} s; "
              f"report: [bold]{escape(str(result.path / 'report.html'))}[/]")
