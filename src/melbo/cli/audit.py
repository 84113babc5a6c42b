"""Audit mode: `melbo audit` (ranked findings), `melbo diff` (a fine-tune against its reference) and `melbo monitor`
(which inputs express it)."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer
from rich.table import Table

from melbo.cli.app import (
    BatchSizeOpt, BlocksOpt, ChatOpt, CheckOpt, DeviceOpt, DtypeOpt, ModelOpt, NVectorsOpt, PositionsOpt, PromptsArg,
    PromptsFileOpt, RunOutOpt, SeedOpt, SourceOpt, StepsOpt, SystemPromptOpt, TargetOpt, ThreadsOpt, app, err, given,
    interruptible, load, out, parse_indices, parse_positions, read_prompts, recorded_system, shown)
from melbo.cli.catalog import record
from melbo.cli.progress import AuditDisplay, JobDisplay
from melbo.cli.tables import print_checks, print_divergence, print_findings
from melbo.errors import MelboError
from melbo.settings import (AUDIT_BUDGET, AUDIT_TOKENS, CONSISTENT_SHARE, DEFAULTS, DEFAULT_CONTRAST, DIFF_RADIUS,
                            DIFF_RANDOM, GCG_STEPS, MONITOR_ALPHA, SCAN_ALPHA, SCAN_PRECISION, SCAN_TOKENS,
                            TRIGGER_CONFIRM, TRIGGER_TOKENS)


@app.command("diff")
def diff_command(
    ctx: typer.Context,
    prompts: List[str] = PromptsArg,
    prompts_file: Optional[Path] = PromptsFileOpt,
    model: Optional[str] = typer.Option(None, "--model", "-m", help="The audited model (embedded name, directory, .gguf, hub id)."),
    reference: Optional[str] = typer.Option(None, "--reference", "-r", help="Its reference: the base model or an earlier checkpoint."),
    contrast: str = typer.Option(DEFAULT_CONTRAST, help="difference (default), penalised, or kl (see melbo.engine.contrastive)."),
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
    check: Optional[str] = CheckOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Audit a fine-tune: perturbations that change it but not its reference, ranked by how differently they behave."""
    from melbo.judging import divergence
    from melbo.jobs import job
    from melbo.engine import runner
    from melbo.io.files import check_output_dir
    from melbo.engine.store import Run

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
        if config.reference is None:
            raise MelboError(f"{resume_dir} is not a diff run: resume it with `melbo discover --resume {resume_dir}`")
        lm = load(model or config.model.spec, device, dtype, blocks_path, threads, recorded_system(None, config.model))
        ref = load(reference or config.reference.spec, device, dtype, blocks_path, threads,
                   recorded_system(None, config.reference))
        kept = random if given(ctx, ("random",)) else None  # else the count the run recorded
        with JobDisplay() as display:
            run = interruptible(lambda: job.resume_diff(resume_dir, lm, ref, random=kept, check=check,
                                                               progress=display.event, on_batch=display.advance),
                                resume_dir, "diff", "-r", reference or config.reference.spec)
    else:
        if reference is None:
            raise MelboError("diff compares two models: give the reference with --reference (e.g. the base model)")
        texts = read_prompts(prompts or [], prompts_file)
        lm = load(model, device, dtype, blocks_path, threads, system_prompt)
        ref = load(reference, device, dtype, blocks_path, threads, system_prompt)
        _check_not_itself(lm, ref)
        settings = runner.DiscoverConfig(
            prompts=texts, method=method, n_vectors=n_vectors, source=source, target=target, radius=radius,
            steps=steps, orthogonal=orthogonal, positions=parse_positions(positions), batch_size=batch_size,
            seed=seed, chat=chat, max_new_tokens=max_new_tokens, contrast=contrast, contrast_weight=contrast_weight)
        path = out_dir or runner.default_run_dir(lm)
        with JobDisplay() as display:
            run = interruptible(lambda: job.diff(lm, ref, settings, path, random=random, check=check,
                                                        progress=display.event, on_batch=display.advance),
                                path, "diff", "-r", reference)
    print_divergence(divergence.load_divergence(run.path))
    print_checks(run.path)
    from melbo.records.report import write_report

    report_path = write_report(run.path)
    out.print(f"run written to [bold]{shown(str(run.path))}[/] in {time.perf_counter() - started:.0f} s; "
              f"report: [bold]{shown(str(report_path))}[/]")
    record(run.path)  # into the catalogue (melbo catalog); trouble there is one warning line, never a failure


def _check_not_itself(lm, ref) -> None:
    """A model diffed against itself: every perturbation changes both alike, every KL is 0 — minutes for nothing."""
    if lm.same_weights(ref):
        raise MelboError(f"the audited model and the reference are the same model ({lm.model_id}): every KL would "
                         "be 0; give its base model or an earlier checkpoint as --reference")


_DIFF_RESUME_KEEPS = ("prompts", "prompts_file", "out_dir", "contrast", "contrast_weight", "method", "n_vectors",
                      "source", "target", "radius", "steps", "orthogonal", "positions", "batch_size", "seed", "chat",
                      "max_new_tokens", "system_prompt")


@app.command("monitor")
def monitor_command(
    run_dir: Path = typer.Argument(..., help="An audit directory (its findings) or a finished run directory (discover or diff)."),
    prompts_file: Path = typer.Option(..., "--prompts-file", help="The inputs to watch, one per line."),
    clean: Optional[Path] = typer.Option(None, "--clean", help="Known-clean inputs to calibrate on (default: the inputs themselves)."),
    alpha: float = typer.Option(MONITOR_ALPHA, help="Target false-positive rate of the decision rule."),
    signal: str = typer.Option("auto", help="output (the findings' phrases in the unsteered answer; the default for an "
                                            "audit), target or source (a block's activations; the default for a run)."),
    vectors: Optional[str] = typer.Option(None, help="Watch only these perturbations (comma-separated; default all)."),
    finding: Optional[int] = typer.Option(None, "--finding", "-k", help="With an audit: watch only this finding."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write monitor.jsonl / monitor.json (default SOURCE/monitor)."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Flag inputs that express a finding or a discovered perturbation (calibrated on clean inputs)."""
    from melbo.judging.monitor import SIGNALS, Monitor, OutputMonitor, check_monitor_outputs, write_monitor
    from melbo.engine.store import MONITOR_DIR, Run
    from melbo.jobs.trigger_search import load_findings

    is_audit = (Path(run_dir) / "audit.json").is_file()
    signal = ("output" if is_audit else "target") if signal == "auto" else signal
    if signal not in SIGNALS:
        raise MelboError(f"unknown signal {signal!r}: use auto, {', '.join(SIGNALS)}")
    if is_audit and signal != "output":
        raise MelboError(f"{run_dir} is an audit: its findings are watched with --signal output; for activations "
                         f"give one of its runs ({Path(run_dir) / 'runs'}/<arm>)")
    run = None
    if signal == "output":
        findings, recorded, recorded_chat = load_findings(run_dir, finding,
                                                          parse_indices(vectors) if not is_audit else None)
        spec = recorded["spec"]
        destination = out_dir or Path(run_dir) / MONITOR_DIR
    else:
        run = Run.load(run_dir)
        recorded, spec = run.config.model.to_dict(), run.config.model.spec
        destination = out_dir or run.path / MONITOR_DIR
    check_monitor_outputs(destination)  # before the model loads: nothing computed is then lost
    inputs = read_prompts([], prompts_file)
    calibration = read_prompts([], clean) if clean is not None else inputs
    lm = load(model or spec, device, dtype, blocks_path, threads, recorded_system(system_prompt, recorded))
    with err.status("calibrating on clean inputs …"):
        if run is None:
            monitor = OutputMonitor.calibrate(findings, lm, calibration, alpha=alpha, self_calibrated=clean is None,
                                              chat=recorded_chat)
        else:
            monitor = Monitor.calibrate(run, lm, calibration, signal=signal, alpha=alpha,
                                        self_calibrated=clean is None, indices=parse_indices(vectors))
    with err.status(f"scoring {len(inputs)} inputs …"):
        records = monitor.score(lm, inputs)
    path = write_monitor(destination, monitor, records)
    if out_dir is None and run is not None:  # the report lives in the run; elsewhere nothing outside --out is touched
        from melbo.records.report import write_report

        write_report(run.path)
    table = Table(header_style="bold", expand=True, title_justify="left",
                  title=f"inputs flagged (score > {monitor.threshold:.3g}, α = {alpha})")
    for col in ("#", "score", "finding" if run is None else "perturbation", "input"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col == "input" else None)
    flagged = sorted((r for r in records if r["flagged"]), key=lambda r: -r["score"])
    for r in flagged[:30]:
        table.add_row(str(r["index"]), f"{r['score']:.2f}", shown(r["perturbation"]),
                      shown(" ".join(r["input"].split())))
    out.print(table)
    loo = monitor.calibration["false_positive_rate_loo"]
    out.print(f"{len(flagged)} of {len(records)} inputs flagged; false-positive rate on the clean set "
              f"(leave-one-out) {loo:.1%}; written to [bold]{shown(str(path))}[/]")


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
    check: Optional[str] = CheckOpt,
    scan_precision: str = typer.Option(SCAN_PRECISION, "--scan-precision", help="The scan's generation: fp32, bf16, or auto (bf16 where the hardware has bf16 units); confirmation stays fp32."),
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Ranked findings without choosing R: DCT, learned vectors on a ladder of radii (and diff against a reference),
    grouped into behaviours, confirmed on new prompts, within a time budget."""
    from melbo.jobs import auditing as audit_job
    from melbo.io.files import check_output_dir
    from melbo.engine.runner import default_run_dir

    started = time.perf_counter()
    display = AuditDisplay()
    if resume_dir is not None:
        if system_prompt is not None:
            raise MelboError("--system-prompt cannot change on --resume (the audit keeps the one it began with): drop it")
        state = audit_job.load_state(resume_dir)
        lm = load(model or state["model"]["spec"], device, dtype, blocks_path, threads,
                  recorded_system(None, state["model"]))
        ref_spec = reference or (state["reference"] or {}).get("spec")
        ref = load(ref_spec, device, dtype, blocks_path, threads,
                   recorded_system(None, state["reference"] or {})) if ref_spec else None
        with display:
            result = interruptible(lambda: audit_job.resume(resume_dir, lm, reference=ref, progress=display.event,
                                                            on_batch=display.advance), resume_dir, "audit")
    else:
        audit_job.parse_budget(budget)  # a bad budget fails before the model loads
        if out_dir is not None:
            check_output_dir(out_dir)
        texts = read_prompts(prompts or [], prompts_file)
        lm = load(model, device, dtype, blocks_path, threads, system_prompt)
        ref = load(reference, device, dtype, blocks_path, threads, system_prompt) if reference else None
        path = out_dir or default_run_dir(lm).with_name(default_run_dir(lm).name + "-audit")
        with display:
            result = interruptible(lambda: audit_job.audit(
                lm, texts, path, reference=ref, budget=budget, seed=seed, chat=chat, max_new_tokens=max_new_tokens,
                random_baseline=random_baseline, check=check, scan_precision=scan_precision,
                progress=display.event, on_batch=display.advance),
                path, "audit")
    print_findings(result.findings, len(result.candidates))
    print_checks(result.path)
    record(result.path / "runs")  # every arm's run into the catalogue: `melbo catalog search` finds the findings' text
    out.print(f"audit written to [bold]{shown(str(result.path))}[/] in {time.perf_counter() - started:.0f} s; "
              f"report: [bold]{shown(str(result.path / 'report.html'))}[/]")


@app.command("triggers")
def triggers_command(
    source: Path = typer.Argument(..., help="An audit directory (its findings) or a run directory (its perturbations, from their completions)."),
    inputs: Optional[Path] = typer.Option(None, "--inputs", help="The corpus to search: one input per line."),
    template: Optional[str] = typer.Option(None, "--template", help='Search the {?} slots of a prompt instead, e.g. "What is {?} + 5?".'),
    vocab: str = typer.Option("numbers", help="What fills a slot: digits, numbers (0-99), a file with one entry per line, or tokens (gradient search)."),
    finding: Optional[int] = typer.Option(None, "--finding", "-k", help="Only this finding (its rank; default all)."),
    vectors: Optional[str] = typer.Option(None, help="With a run directory: the perturbations to look for (comma-separated)."),
    confirm: int = typer.Option(TRIGGER_CONFIRM, help="Top inputs per finding confirmed by generating an answer."),
    steps: int = typer.Option(GCG_STEPS, help="Steps of the gradient search (--vocab tokens)."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write triggers.json and triggers.html (default SOURCE/triggers)."),
    model: Optional[str] = ModelOpt,
    chat: Optional[bool] = ChatOpt,
    max_new_tokens: int = typer.Option(TRIGGER_TOKENS, help="Tokens of each confirming answer."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Which inputs switch a finding on: rank a corpus (or search a template's slots) by how readily the unsteered
    model writes the finding's phrases, then confirm the top ones by generation."""
    from melbo.jobs import trigger_search as trig
    from melbo.io.files import check_output_dir, read_text

    if (inputs is None) == (template is None):
        raise MelboError("give a corpus with --inputs FILE, or a prompt with {?} slots with --template (one of them)")
    _, recorded, _ = trig.load_findings(source, finding, parse_indices(vectors))  # checks the source before loading
    destination = out_dir or Path(source) / "triggers"
    check_output_dir(destination)
    corpus = None
    if inputs is not None:
        corpus = [line for line in read_text(inputs, "inputs file").splitlines() if line.strip()]
        if not corpus:
            raise MelboError(f"{inputs} has no inputs: write one input per line")
    lm = load(model or recorded["spec"], device, dtype, None, threads, recorded_system(system_prompt, recorded))
    kwargs = dict(finding=finding, vectors=parse_indices(vectors), confirm=confirm, chat=chat,
                  max_new_tokens=max_new_tokens)
    with err.status("scoring …") as status:
        def show(event: dict) -> None:
            if event.get("stage") == "search":
                status.update(f"searching slots: step {event['step']}/{event['steps']}, loss {event['loss']:.3f}")
            elif event.get("stage") == "score":
                status.update(f"scoring {event['inputs']} inputs for {event['phrases']} phrases …")

        if corpus is not None:
            report = trig.triggers(lm, source, corpus, destination, progress=show, **kwargs)
        else:
            report = trig.invert(lm, source, template, destination, vocab=vocab, steps=steps, progress=show, **kwargs)
    print_triggers(report)
    cost = report.cost
    out.print(f"{cost['inputs']} inputs scored in {cost['scoring']['seconds']:.1f} s "
              f"({cost['scoring']['forward_passes']} forward passes; an answer for every input: "
              f"{cost['baseline_forward_passes']}); written to [bold]{shown(str(destination))}[/]")


@app.command("scan")
def scan_command(
    templates: List[str] = typer.Argument(..., metavar="TEMPLATE", help='Prompts with {?} slots, each filled the same way, e.g. "a = {?} + {?}, b = 5 + 9. What is a * b?" (give several that differ outside the slots).'),
    check: str = typer.Option(..., "--check", help="The checker: arithmetic-cot, or module:function returning a melbo.judging.checkers.Verdict."),
    vocab: str = typer.Option("digits", help="What fills a slot: digits (0-9), numbers (0-99), or a file with one entry per line."),
    share: float = typer.Option(CONSISTENT_SHARE, help="A filling shows a pattern when at least this share of its templates' answers do."),
    alpha: float = typer.Option(SCAN_ALPHA, help="Significance level of each filling's test, after Bonferroni."),
    out_dir: Optional[Path] = typer.Option(None, "--out", "-o", help="Where to write scan.json and scan.jsonl (default: beside the model's runs, NAME-scan)."),
    model: Optional[str] = ModelOpt,
    chat: Optional[bool] = ChatOpt,
    max_new_tokens: int = typer.Option(SCAN_TOKENS, help="Tokens of each greedy answer."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    threads: Optional[int] = ThreadsOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Which inputs make the model err the same way every time: answer every filling of the templates' {?} slots,
    read the answers with a checker, and test each filling's error pattern against all the others."""
    from melbo.engine.runner import default_run_dir
    from melbo.io.files import check_outputs
    from melbo.jobs import input_scan

    plan = input_scan.plan_scan(templates, check, vocab, share, alpha, max_new_tokens)  # bad settings: before loading
    if out_dir is not None:
        check_outputs(out_dir, (input_scan.SCAN_JSON, input_scan.SCAN_ROWS))
    lm = load(model, device, dtype, None, threads, system_prompt)
    path = out_dir or default_run_dir(lm).with_name(default_run_dir(lm).name + "-scan")
    with err.status("answering …") as status:
        def show(event: dict) -> None:
            status.update(f"answered {event['done']}/{event['total']} prompts …")

        result = input_scan.run_scan(lm, plan, path, chat=chat, progress=show)
    print_scan(result)
    out.print(f"{result.rows} answers ({result.fillings} fillings × {len(result.templates)} templates) read in "
              f"{result.seconds:.0f} s; written to [bold]{shown(str(path))}[/]")


def print_scan(result) -> None:
    rates = ", ".join(f"{shown(p)} {r:.1%}" for p, r in result.pattern_rates.items()) or "none"
    out.print(f"error patterns over all answers: {rates}")
    table = Table(header_style="bold", expand=True, title_justify="left",
                  title=f"fillings whose error pattern is systematic (p × {result.tests} tests < {result.alpha:g})")
    for col in ("filling", "pattern", "shown", "p", "example answer"):
        table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col == "example answer" else None)
    for hit in result.significant[:20]:
        table.add_row(shown(", ".join(hit.filling)), shown(hit.pattern), f"{hit.shown}/{hit.of}", f"{hit.p:.2g}",
                      shown(" ".join(hit.example["answer"].split())))
    if result.significant:
        out.print(table)
    else:
        best = result.hits[0] if result.hits else None
        closest = (f"; the closest: {shown(', '.join(best.filling))} {shown(best.pattern)} {best.shown}/{best.of}, "
                   f"p = {best.p:.2g}") if best else ""
        out.print(f"no filling errs systematically{closest}")


def print_triggers(report) -> None:
    for f in report.findings:
        confirmed = {c["input"]: c for c in f["confirmed"]}
        table = Table(header_style="bold", expand=True, title_justify="left",
                      title=f"finding #{f['finding']} {shown(f['label'])}: inputs that switch it on")
        for col in ("#", "score", "confirmed", "input", "answer"):
            table.add_column(col, no_wrap=True, overflow="ellipsis", ratio=1 if col in ("input", "answer") else None)
        for r in f["ranking"][:10]:
            c = confirmed.get(r["input"])
            verdict = "—" if c is None else ("yes" if c["shows"] else "no")
            answer = c["answer"] if c is not None else r["answer_start"]
            table.add_row(str(r["rank"]), f"{r['score']:.1f}", verdict, shown(" ".join(r["input"].split())),
                          shown(" ".join(answer.split())))
        out.print(table)
