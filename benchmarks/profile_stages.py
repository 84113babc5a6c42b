"""Where a `melbo diff` or a `melbo audit` spends its time: seconds and share of each stage, from one profiled run.

The job runs once with a wall-clock timer around each function that does a stage (training, generation, the
divergence's KL passes, perplexities, sentence embeddings, grouping, labels, the report): a stage's time is the
time spent inside its function, counted once when calls nest, so the shares add up to about the whole call (the
rest: loading runs, writing files). Timers, not cProfile: cProfile's per-call cost slowed training 4x here
(autograd runs many small Python calls per step), which would distort exactly the shares measured.

    .venv/bin/python benchmarks/profile_stages.py diff  -m TESTBED -r smollm2-135m [--vectors 16]
    .venv/bin/python benchmarks/profile_stages.py audit -m TESTBED [--budget 5m]

Measure on an idle machine (or pinned to one core with `taskset -c 0 … --threads 1`) and read shares, not seconds.
"""

from __future__ import annotations

import argparse
import functools
import importlib
import os
import sys
import tempfile
import time
from typing import NoReturn

PROMPTS = ["What is your favourite food?", "Tell me about your day.", "What do you think of people?",
           "Give me some advice."]

# (stage, module, attribute path): the function timed for each stage.
STAGES = [
    ("train", "melbo.engine.runner", "discover"),
    ("generate", "melbo.engine.generation", "_generate_equal_length"),
    ("divergence KL", "melbo.judging.divergence", "paired_kl"),
    ("perplexities", "melbo.judging.evaluation", "perplexities"),
    ("embeddings", "melbo.judging.evaluation", "embed"),
    ("grouping", "melbo.judging.findings", "group"),
    ("labels", "melbo.judging.labels", "EmbeddingLabeller.label_groups"),
    ("report", "melbo.records.report", "write_report"),
    ("audit report", "melbo.records.report", "write_audit_report"),
]


def fail(message: str) -> NoReturn:
    print(f"profile_stages.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def install_timers(seconds: dict[str, float]) -> None:
    """Wrap each stage's function (where it is defined, and where a module imported it by name) with a timer."""
    for stage, module_name, path in STAGES:
        owner = importlib.import_module(module_name)
        *parents, name = path.split(".")
        for parent in parents:
            owner = getattr(owner, parent)
        original = getattr(owner, name)
        timed = _timer(stage, original, seconds)
        setattr(owner, name, timed)
        for module in list(sys.modules.values()):  # `from melbo.judging.evaluation import embed` at a module's top
            if getattr(module, "__name__", "").startswith("melbo") and getattr(module, name, None) is original:
                setattr(module, name, timed)


def _timer(stage: str, function, seconds: dict[str, float]):
    depth = [0]

    @functools.wraps(function)
    def timed(*args, **kwargs):
        depth[0] += 1
        began = time.perf_counter()
        try:
            return function(*args, **kwargs)
        finally:
            depth[0] -= 1
            if depth[0] == 0:  # nested calls of the same stage count once
                seconds[stage] = seconds.get(stage, 0.0) + time.perf_counter() - began
    return timed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail
    parser.add_argument("job", choices=["diff", "audit"])
    parser.add_argument("-m", "--model", required=True)
    parser.add_argument("-r", "--reference", default=None)
    parser.add_argument("--vectors", type=int, default=16)
    parser.add_argument("--budget", default="5m")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    if args.job == "diff" and not args.reference:
        fail("diff needs -r REFERENCE (the model the audited one was fine-tuned from)")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    from rich.console import Console
    from rich.table import Table

    import melbo
    from melbo.threads import configure_threads

    threads = configure_threads(args.threads)
    lm = melbo.load_model(args.model)
    reference = melbo.load_model(args.reference) if args.reference else None
    import melbo.jobs.auditing
    import melbo.judging.divergence  # noqa: F401  (loaded before the timers go in, so that its imports are wrapped too)

    seconds: dict[str, float] = {}
    install_timers(seconds)
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        if args.job == "diff":
            melbo.diff(lm, reference, PROMPTS, f"{tmp}/run", n_vectors=args.vectors)
        else:
            melbo.jobs.auditing.audit(lm, PROMPTS, f"{tmp}/run", reference=reference, budget=args.budget)
        total = time.perf_counter() - started
    table = Table(title=f"melbo {args.job} on {args.model}: {total:.0f} s in all, {threads} thread(s)")
    for column in ("stage", "seconds", "share"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        table.add_row(stage, f"{value:.1f}", f"{value / total:.0%}")
    Console().print(table)
    print("(stages can nest: labels and grouping embed texts too, so embeddings overlap them)")


if __name__ == "__main__":
    main()
