"""Training speed against the batch size, and what `torch.compile` costs and buys: the numbers behind the defaults.

Each configuration runs in a fresh process (so that peak memory is its own): `melbo.discover` of --vectors
vectors for --steps steps on the audit's kind of prompts, timed whole (warm-up included). With compile, the same
call runs twice in the process: the first pays for compiling, the second shows the compiled speed; the
difference is the compile cost, from an empty inductor cache ("cold") and again from the cache the cold run
filled ("warm", the case melbo's own cache directory gives from the second run on). Break-even: the
vector-steps beyond which compiling first is faster, C / (1/r_eager − 1/r_compiled).

    .venv/bin/python benchmarks/train_batch.py [--sizes 16 32 64] [--vectors 64] [--steps 10] [--threads 1]
        [-m TESTBED --diff smollm2-135m]   # also diff's training (two models per step) against discover's

Ratios only; measure idle (or pinned to a core no other process uses: `taskset -c 0 … --threads 1`).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from typing import NoReturn

PROMPTS = ["What is your favourite food?", "Tell me about your day.", "What do you think of people?",
           "Give me some advice."]


def fail(message: str) -> NoReturn:
    print(f"train_batch.py: error: {message}", file=sys.stderr)
    sys.exit(2)


def child(config: dict) -> None:
    """One configuration, in this process: prints a JSON line of seconds per call and the peak RSS."""
    import resource
    import time

    import melbo
    from melbo.threads import configure_threads

    configure_threads(config["threads"])
    lm = melbo.load_model(config["model"])
    extra = {}
    if config.get("reference"):  # melbo diff's training: both models in every step
        extra = {"reference": melbo.load_model(config["reference"]), "contrast": "difference"}
    seconds = []
    for call in range(config["calls"]):
        with tempfile.TemporaryDirectory() as tmp:
            began = time.perf_counter()
            melbo.discover(lm, PROMPTS, f"{tmp}/run", n_vectors=config["vectors"], steps=config["steps"],
                           batch_size=config["batch_size"], compile=config["compile"], seed=call, **extra)
            seconds.append(time.perf_counter() - began)
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux
    print(json.dumps({"seconds": seconds, "peak_mib": peak}))


def run(config: dict, cache: str) -> dict:
    env = {**os.environ, "TORCHINDUCTOR_CACHE_DIR": cache, "HF_HUB_OFFLINE": "1"}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(config)], env=env, text=True,
                         capture_output=True)
    if out.returncode != 0:
        fail(f"configuration {config} failed: {out.stderr.strip().splitlines()[-1:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.error = fail
    parser.add_argument("-m", "--model", default="smollm2-135m")
    parser.add_argument("--sizes", type=int, nargs="+", default=[16, 32, 64])
    parser.add_argument("--vectors", type=int, default=64)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--no-compile", action="store_true", help="only the batch sizes")
    parser.add_argument("--diff", metavar="REFERENCE", help="also time diff's training against this reference "
                        "(give a fine-tune of it as --model), at the first batch size")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        return child(json.loads(args.child))
    if min(args.sizes + [args.vectors, args.steps]) < 1 or max(args.sizes) > args.vectors:
        fail("--sizes, --vectors and --steps must be ≥ 1, and no size above --vectors")

    from rich.console import Console
    from rich.table import Table

    base = {"model": args.model, "vectors": args.vectors, "steps": args.steps, "threads": args.threads}
    work = args.vectors * args.steps
    table = Table(title=f"{args.model}: {args.vectors} vectors × {args.steps} steps per call, whole call timed")
    for column in ("batch", "compile", "vector-steps/s", "× batch 16 eager", "peak MiB", "compile s", "break-even"):
        table.add_column(column, justify="right")
    eager = {}
    with tempfile.TemporaryDirectory() as cache:
        for size in args.sizes:
            result = run({**base, "batch_size": size, "compile": False, "calls": 1}, cache)
            eager[size] = work / result["seconds"][0]
            table.add_row(str(size), "no", f"{eager[size]:.1f}", f"{eager[size] / eager[args.sizes[0]]:.2f}",
                          f"{result['peak_mib']:.0f}", "", "")
        if args.diff:
            result = run({**base, "batch_size": args.sizes[0], "compile": False, "calls": 1,
                          "reference": args.diff}, cache)
            rate = work / result["seconds"][0]
            table.add_row(f"{args.sizes[0]} (diff)", "no", f"{rate:.1f}", f"{rate / eager[args.sizes[0]]:.2f}",
                          f"{result['peak_mib']:.0f}", "", "")
        if not args.no_compile:
            best = max(eager, key=eager.get)
            for state in ("cold", "warm"):  # the second process finds the first one's inductor cache
                result = run({**base, "batch_size": best, "compile": True, "calls": 2}, cache)
                first, steady = result["seconds"]
                rate = work / steady
                cost = first - steady
                even = cost / (1 / eager[best] - 1 / rate) if rate > eager[best] else float("inf")
                table.add_row(str(best), state, f"{rate:.1f}", f"{rate / eager[args.sizes[0]]:.2f}",
                              f"{result['peak_mib']:.0f}", f"{cost:.0f}", f"{even:.0f}")
    Console().print(table)


if __name__ == "__main__":
    main()
