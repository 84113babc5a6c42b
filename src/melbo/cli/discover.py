"""`melbo discover`: the main job (`melbo.elicit`), or `--resume` of an interrupted one."""

from __future__ import annotations

import time
from pathlib import Path
from typing import List, Optional

import typer

from melbo.cli.app import (
    BatchSizeOpt, BlocksOpt, ChatOpt, CheckOpt, DeviceOpt, DtypeOpt, ModelOpt, NVectorsOpt, PositionsOpt, PromptsArg,
    PromptsFileOpt, RunOutOpt, SeedOpt, SourceOpt, StepsOpt, SystemPromptOpt, TargetOpt, ThreadsOpt, app, given,
    interruptible, load, out, parse_positions, read_prompts, recorded_system, shown)
from melbo.cli.catalog import record
from melbo.cli.progress import JobDisplay
from melbo.cli.tables import print_assessment, print_checks, print_completions
from melbo.errors import MelboError
from melbo.settings import DEFAULT_RANDOM, DEFAULTS


@app.command()
def discover(
    ctx: typer.Context,
    prompts: List[str] = PromptsArg,
    prompts_file: Optional[Path] = PromptsFileOpt,
    model: Optional[str] = ModelOpt,
    out_dir: Optional[Path] = RunOutOpt,
    resume_dir: Optional[Path] = typer.Option(None, "--resume", help="Continue an interrupted run directory."),
    method: str = typer.Option(DEFAULTS.method, help="vectors, adapters, jacobian (top singular directions, fast) or dct (exponential DCT factors, fast)."),
    n_vectors: int = NVectorsOpt,
    source: Optional[int] = SourceOpt,
    target: Optional[int] = TargetOpt,
    radius: str = typer.Option(DEFAULTS.radius, help="R: absolute (4.0), relative to the source's median residual norm (e.g. 0.2x), auto (a sweep) or calibrate (seconds)."),
    p: float = typer.Option(DEFAULTS.p, help="Power per position (2; 4 = spikier)."),
    q: float = typer.Option(DEFAULTS.q, help="Outer root (1 or p)."),
    steps: int = StepsOpt,
    lr: float = typer.Option(DEFAULTS.lr, help="Learning rate, relative to a parameter's typical coordinate size."),
    orthogonal: str = typer.Option(DEFAULTS.orthogonal, help="hard (vectors only), soft (penalise aligned changes) or none."),
    soft_weight: float = typer.Option(DEFAULTS.soft_weight, help="Weight of the soft-orthogonality penalty."),
    rank: int = typer.Option(DEFAULTS.rank, help="Adapter rank."),
    batch_size: int = BatchSizeOpt,
    seed: int = SeedOpt,
    chat: Optional[bool] = ChatOpt,
    positions: str = PositionsOpt,
    orthogonal_to: Optional[Path] = typer.Option(None, help="Keep new vectors orthogonal to this run's vectors."),
    max_new_tokens: int = typer.Option(DEFAULTS.max_new_tokens, help="Tokens to generate per completion."),
    random: int = typer.Option(DEFAULT_RANDOM, help="Random vectors of the same R to compare against (0: skip the assessment)."),
    power_iterations: int = typer.Option(DEFAULTS.power_iterations, help="Power iterations (methods jacobian and dct)."),
    precision: str = typer.Option(DEFAULTS.precision, help="Training matmuls: auto (bf16 on AMX/AVX512-BF16 CPUs and GPUs), fp32, bf16."),
    compile_: bool = typer.Option(DEFAULTS.compile, "--compile/--no-compile", help="torch.compile the blocks after the source (fuses element-wise work; with bf16 copies on a CPU no faster: docs/performance.md; kernels cached in $MELBO_CACHE/inductor)."),
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
    check: Optional[str] = CheckOpt,
    system_prompt: Optional[str] = SystemPromptOpt,
) -> None:
    """Learn perturbations on prompts, generate with each, write a run directory: the main job."""
    from melbo.jobs import job
    from melbo.engine.generation import Completion
    from melbo.io.files import check_output_dir
    from melbo.engine.store import Run

    started = time.perf_counter()
    job.check_random(random)
    if out_dir is not None:
        check_output_dir(out_dir)  # before minutes of loading and training
    display = JobDisplay()
    if resume_dir is not None:
        if fixed := given(ctx, _RESUME_KEEPS):
            raise MelboError(f"{', '.join(fixed)} cannot change on --resume (the run keeps its recorded settings): "
                             "drop them")
        recorded = Run.load(resume_dir)
        lm = load(model or recorded.config.model.spec, device, dtype, blocks_path, threads,
                  recorded_system(None, recorded.config.model))
        chosen = random if given(ctx, ("random",)) else None  # else the run's own baseline
        with display:
            run = interruptible(lambda: job.resume_job(resume_dir, lm, random=chosen, progress=display.event,
                                                        on_batch=display.advance, check=check), resume_dir)
    else:
        texts = read_prompts(prompts or [], prompts_file)
        lm = load(model, device, dtype, blocks_path, threads, system_prompt)
        previous = Run.load(orthogonal_to).vectors if orthogonal_to is not None else None
        path = out_dir or job.default_run_dir(lm)
        with display:
            run = interruptible(lambda: job.elicit(
                lm, texts, path, random=random, previous=previous, progress=display.event,
                on_batch=display.advance, method=method, n_vectors=n_vectors, source=source, target=target,
                radius=radius, p=p, q=q, steps=steps, lr=lr, orthogonal=orthogonal, soft_weight=soft_weight,
                rank=rank, batch_size=batch_size, seed=seed, chat=chat, positions=parse_positions(positions),
                max_new_tokens=max_new_tokens, precision=precision, compile=compile_,
                power_iterations=power_iterations, check=check), path)
    print_completions([Completion(**row) for row in run.completions()])
    print_assessment(run)
    print_checks(run.path)
    out.print(f"report: [bold]{shown(str(run.path / 'report.html'))}[/]")
    out.print(f"run written to [bold]{shown(str(run.path))}[/] in {time.perf_counter() - started:.0f} s "
              f"(R = {run.config.radius:.4g} = {run.config.radius_relative:.3g} x residual norm)")
    record(run.path)  # into the catalogue (melbo catalog); trouble there is one warning line, never a failure


# discover's options that set up training: fixed once a run exists.
_RESUME_KEEPS = ("prompts", "prompts_file", "out_dir", "method", "n_vectors", "source", "target", "radius", "p", "q",
                 "steps", "lr", "orthogonal", "soft_weight", "rank", "batch_size", "seed", "chat", "positions",
                 "orthogonal_to", "max_new_tokens", "power_iterations", "precision", "compile_", "system_prompt")
