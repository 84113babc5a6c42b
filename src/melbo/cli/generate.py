"""`melbo generate`: a run's perturbations (selected, scaled, combined, or random) on new prompts."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer

from melbo.cli.app import (
    BlocksOpt, DeviceOpt, DtypeOpt, ModelOpt, SystemPromptOpt, ThreadsOpt, app, load, parse_indices, read_prompts,
    recorded_system,
)
from melbo.cli.progress import generation_progress
from melbo.cli.tables import print_completions


@app.command()
def generate(
    run_dir: Path = typer.Argument(..., help="A run directory written by `melbo discover`."),
    prompts: List[str] = typer.Option(None, "--prompts", "-p", help="Prompts (repeatable)."),
    prompts_file: Optional[Path] = typer.Option(None, help="File with one prompt per line."),
    vectors: Optional[str] = typer.Option(None, help="Comma-separated vector indices (default: all)."),
    scale: float = typer.Option(1.0, help="Multiply every perturbation by this, within ±100 (negative subtracts)."),
    expr: List[str] = typer.Option(None, "--expr", help='Vector arithmetic, e.g. "v9 - 0.5*v22" (repeatable).'),
    random: int = typer.Option(0, help="Also generate with K random vectors of matched norm (baseline)."),
    max_new_tokens: int = typer.Option(48),
    temperature: float = typer.Option(0.0, help="0 = greedy."),
    top_p: float = typer.Option(1.0),
    samples: int = typer.Option(1, help="Samples per (vector, prompt) when sampling."),
    seed: int = typer.Option(0),
    system_prompt: Optional[str] = SystemPromptOpt,
    out_file: Optional[Path] = typer.Option(None, "--out", "-o", help="Write completions as JSON lines here."),
    model: Optional[str] = ModelOpt,
    device: str = DeviceOpt,
    dtype: str = DtypeOpt,
    blocks_path: Optional[str] = BlocksOpt,
    threads: Optional[int] = ThreadsOpt,
) -> None:
    """Apply a run's perturbations (selected, scaled, combined, or random) to new prompts."""
    from melbo.engine.generation import Sampling
    from melbo.engine.arithmetic import perturbation_set
    from melbo.checks import check_scale
    from melbo.io.files import check_output_file
    from melbo.engine.store import Run
    from melbo.engine import generation

    if out_file is not None:
        check_output_file(out_file)  # before generating: nothing computed is lost to a bad path
    check_scale(scale)
    run = Run.load(run_dir)
    texts = read_prompts(prompts or [], prompts_file)
    sampling = Sampling(max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, samples=samples, seed=seed)
    lm = load(model or run.config.model.spec, device, dtype, blocks_path, threads,
              recorded_system(system_prompt, run.config.model))
    run.attach(lm)
    perturbations, labels = perturbation_set(run, parse_indices(vectors), list(expr or []), random, seed)
    bar, advance = generation_progress((len(perturbations) + 1) * len(texts) * (samples if temperature > 0 else 1))
    with bar:
        completions = generation.generate(lm, perturbations, texts, labels=labels, scale=scale,
                                          chat=run.settings.chat, sampling=sampling, on_batch=advance)
    if out_file is not None:
        from melbo.io.files import make_output_dir, write_jsonl

        make_output_dir(out_file.parent)
        write_jsonl(out_file, [c.to_json() for c in completions])
    print_completions(completions)
