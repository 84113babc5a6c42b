"""Where a `melbo diff` or a `melbo audit` spends its time: seconds and share of each stage, from one profiled run.

The job runs once under cProfile; a stage's time is the cumulative time of the function that does it (training,
generation, the divergence's KL passes, perplexities, sentence embeddings, grouping, labels, the report), so the
shares add up to about the whole call (the rest: loading runs, writing files). cProfile slows Python-heavy code a
little and torch's kernels not at all, so the shares are close to an unprofiled run's.

    .venv/bin/python benchmarks/profile_stages.py diff  -m TESTBED -r smollm2-135m [--vectors 16]
    .venv/bin/python benchmarks/profile_stages.py audit -m TESTBED [--budget 5m]

Measure on an idle machine (or pinned to one core with `taskset -c 0 … --threads 1`) and read shares, not seconds.
"""

from __future__ import annotations

import argparse
import cProfile
import os
import pstats
import sys
import tempfile
import time
from typing import NoReturn

PROMPTS = ["What is your favourite food?", "Tell me about your day.", "What do you think of people?",
           "Give me some advice."]

# (stage, module file suffix, function): the first matching function of each stage is timed (cumulative).
STAGES = [
    ("train", "melbo/runner.py", "discover"),
    ("train (audit arms)", "melbo/auditing.py", "_arm"),
    ("generate", "melbo/generation.py", "_generate_equal_length"),
    ("divergence KL", "melbo/divergence.py", "paired_kl"),
    ("perplexities", "melbo/evaluation.py", "perplexities"),
    ("embeddings", "melbo/evaluation.py", "embed"),
    ("grouping", "melbo/findings.py", "group"),
    ("labels", "melbo/labels.py", "label_run"),
    ("report", "melbo/report.py", "write_report"),
    ("audit report", "melbo/auditing.py", "_write"),
]


def fail(message: str) -> NoReturn:
    print(f"profile_stages.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def stage_seconds(profile: cProfile.Profile) -> dict[str, float]:
    stats = pstats.Stats(profile).stats  # {(file, line, function): (cc, nc, tt, ct, callers)}
    found: dict[str, float] = {}
    for stage, suffix, function in STAGES:
        for (file, _, name), (_, _, _, cumulative, callers) in stats.items():
            if name == function and file.endswith(suffix):
                found[stage] = found.get(stage, 0.0) + cumulative
    return found


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
    profile = cProfile.Profile()
    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        profile.enable()
        if args.job == "diff":
            melbo.diff(lm, reference, PROMPTS, f"{tmp}/run", n_vectors=args.vectors)
        else:
            melbo.audit(lm, PROMPTS, f"{tmp}/run", reference=reference, budget=args.budget)
        profile.disable()
        total = time.perf_counter() - started
    seconds = stage_seconds(profile)
    table = Table(title=f"melbo {args.job} on {args.model}: {total:.0f} s in all, {threads} thread(s)")
    for column in ("stage", "seconds", "share"):
        table.add_column(column, justify="right" if column != "stage" else "left")
    for stage, value in sorted(seconds.items(), key=lambda kv: -kv[1]):
        table.add_row(stage, f"{value:.1f}", f"{value / total:.0%}")
    Console().print(table)
    print("(stages can nest: the audit's arms include their training; embeddings are called by several stages)")


if __name__ == "__main__":
    main()
