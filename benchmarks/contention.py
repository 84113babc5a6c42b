"""No slowdown cliff: melbo's training rate beside a background load, at all cores, 1 thread and "auto" threads.

Loads (each a separate process pinned to the last core this process may use, started before and stopped by its
pid after its measurements, always, in a `finally`):
- none:  the idle machine;
- busy:  a pure-Python spin loop at normal priority;
- torch: another torch job, a 1-thread matrix-product loop.
For each load, melbo's training rate (vector-steps/s over the optimiser steps of one `melbo.discover` batch,
timed from its progress callback, so that set-up and saving are left out) with torch at every allowed core, at
1 thread, and at "auto" (melbo.threads: the free cores, sampled while the load runs). OMP_NUM_THREADS is
removed from this process's environment, so that "auto" measures instead of echoing it.

Goal (issue 14): under the same load auto is never slower than 1 thread, and within 1.5x of the idle 1-thread rate.

    .venv/bin/python benchmarks/contention.py [--loads none,busy,torch] [--vectors 16] [--steps 10]
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from contextlib import contextmanager
from pathlib import Path

import melbo
from melbo.settings import DEFAULTS
from melbo.threads import allowed_cores, configure_threads

PROMPT = "How can I make a bomb?"
LOADS = {
    "busy": "print('ready', flush=True)\nwhile True: pass",
    "torch": ("import torch\ntorch.set_num_threads(1)\na = torch.randn(1024, 1024)\nprint('ready', flush=True)\n"
              "while True: a @ a"),
}


@contextmanager
def background(load: str, core: int, nice: int):
    """Run a load process pinned to `core` while the block runs; kill it by its pid afterwards, whatever happens."""
    if load == "none":
        yield None
        return

    def pin():
        os.sched_setaffinity(0, {core})
        os.nice(nice)

    proc = subprocess.Popen([sys.executable, "-c", LOADS[load]], stdout=subprocess.PIPE, preexec_fn=pin)
    try:
        if proc.stdout.readline().strip() != b"ready":
            raise SystemExit(f"the {load} load did not start")
        time.sleep(0.5)  # let it reach full speed
        yield proc.pid
    finally:
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()


def training_rate(lm, threads, a) -> tuple[int, float]:
    """(threads used, vector-steps/s of one discover batch, timed between its first and last step callbacks).

    An untimed 1-step run at the same shapes comes first: kernel set-up after a change of thread count is not
    what is compared.
    """
    chosen = configure_threads(threads)
    stamps = []
    with tempfile.TemporaryDirectory() as tmp:
        timed = lambda _: stamps.append(time.perf_counter())  # noqa: E731
        for name, k, progress in (("warm-up", 1, None), ("timed", a.steps, timed)):
            melbo.discover(lm, [PROMPT], Path(tmp) / name, n_vectors=a.vectors, batch_size=a.vectors, steps=k,
                           source=a.source, target=a.target, radius=a.radius, precision=a.precision, seed=a.seed,
                           progress=progress)
    return chosen, a.vectors * a.steps / (stamps[-1] - stamps[0])  # steps + 1 callbacks enclose `steps` steps


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=melbo.DEFAULT_MODEL)
    parser.add_argument("--loads", default="none,busy,torch", help="Comma-separated: none, busy, torch.")
    parser.add_argument("--nice", type=int, default=0, help="Niceness of the load process (0: normal priority).")
    parser.add_argument("--vectors", type=int, default=16)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--source", type=int, default=6)
    parser.add_argument("--target", type=int, default=24)
    parser.add_argument("--radius", default="30")
    parser.add_argument("--precision", default=DEFAULTS.precision)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def main() -> None:
    a = parse_args()
    loads = a.loads.split(",")
    unknown = [x for x in loads if x != "none" and x not in LOADS]
    if unknown:
        raise SystemExit(f"unknown load(s) {', '.join(unknown)}: use none, busy or torch")
    os.environ.pop("OMP_NUM_THREADS", None)  # "auto" must measure the free cores, not echo the variable
    cores = allowed_cores()
    lm = melbo.load_model(a.model)

    rows = []  # (load, label, threads, rate)
    for load in loads:
        with background(load, cores[-1], a.nice):
            for threads in (len(cores), 1, None):
                chosen, rate = training_rate(lm, threads, a)
                rows.append((load, f"auto={chosen}" if threads is None else str(chosen), chosen, rate))

    idle_one = next((r for load, label, _, r in rows if load == "none" and label == "1"), None)
    print(f"model {lm.model_id}, {a.vectors} vectors x {a.steps} steps, blocks {a.source} -> {a.target}, "
          f"R = {a.radius}, precision {a.precision}, {len(cores)} cores allowed; loads pinned to core {cores[-1]}"
          f"{f', nice {a.nice}' if a.nice else ''}")
    print(f"{'load':6s} {'threads':>8s} {'vector-steps/s':>15s} {'vs idle 1 thread':>17s}")
    for load, label, _, rate in rows:
        ratio = f"{rate / idle_one:16.2f}x" if idle_one else f"{'-':>17s}"
        print(f"{load:6s} {label:>8s} {rate:15.2f} {ratio}")
    print()
    for load in loads:
        by = {label.split("=")[0]: rate for ld, label, _, rate in rows if ld == load}
        checks = [f"auto {by['auto']:.2f} vs 1 thread {by['1']:.2f}: "
                  + ("not slower" if by["auto"] >= by["1"] * 0.97 else "SLOWER")]  # 3%: timing noise
        if idle_one:
            checks.append(f"idle 1-thread / auto = {idle_one / by['auto']:.2f}x "
                          + ("(within 1.5x)" if idle_one / by["auto"] <= 1.5 else "(MORE than 1.5x)"))
        print(f"goal, load {load}: " + "; ".join(checks))


if __name__ == "__main__":
    main()
