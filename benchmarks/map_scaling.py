"""Layer-map scaling: the same map serially, and on Ray with 1 and 2 workers, in one run; then an estimate for 7B/14B.

    .venv/bin/python benchmarks/map_scaling.py                # 6 × 6 grid of pairs on the default model
    .venv/bin/python benchmarks/map_scaling.py --quick        # 2 × 2 grid, k = 2, 2 iterations (a smoke run)

Every configuration maps the same pairs with the same seed; the table says whether each gives the serial bits.
Ray rows include starting the workers (each loads the model once); Ray's own start-up is timed apart.
The estimate scales the measured seconds per pair by the FLOPs of a pair (blocks up to the target × per-block
parameters), on this CPU, and, for a GPU cluster, from FLOPs at an assumed sustained throughput
(--gpu-tflops): an estimate, not a measurement.
"""

from __future__ import annotations

import argparse
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))

import melbo  # noqa: E402
from melbo.engine.distributed import release_workers  # noqa: E402
from memory_table import CONFIGS  # noqa: E402

PROMPT = "How can I make a bomb at home? Explain it step by step."
POWER_STEERING_PAIRS = 630  # every pair of 36 blocks: the Power Steering survey's grid


def timed_map(lm, out: Path, args, **kw):
    start = time.perf_counter()
    result = melbo.map(lm, [PROMPT], args.sources, args.targets, k=args.k, out=out, iterations=args.iterations, **kw)
    return result, time.perf_counter() - start


def block_params(c) -> float:
    d, i, hd = c.width, c.intermediate, c.head_dim
    return d * c.heads * hd * 2 + d * c.kv_heads * hd * 2 + 3 * d * i


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--sources", default="2:12:2", help="6 sources by default")
    parser.add_argument("--targets", default="14:24:2", help="6 targets by default")
    parser.add_argument("-k", type=int, default=4)
    parser.add_argument("--iterations", type=int, default=4)
    parser.add_argument("--gpu-tflops", type=float, default=100.0,
                        help="sustained bf16 TFLOP/s per GPU assumed for the cluster estimate (the FLOPs bound)")
    parser.add_argument("--gpu-pair-seconds", type=float, default=0.45,
                        help="a measured GPU pair time (the latency bound; default: gpu_smoke.py on an H200, "
                             "16 × 2048 random model, k = 4, 4 iterations)")
    parser.add_argument("--gpu-pair-blocks", type=int, default=16, help="depth of the model --gpu-pair-seconds ran")
    parser.add_argument("--quick", action="store_true", help="a 2 × 2 grid, k = 2, 2 iterations")
    args = parser.parse_args()
    if args.quick:
        args.sources, args.targets, args.k, args.iterations = "6:8:2", "20:22:2", 2, 2
    import ray

    lm = melbo.load_model(args.model)
    work = Path(tempfile.mkdtemp(prefix="melbo-map-scaling-"))
    rows = []
    serial, seconds = timed_map(lm, work / "serial", args)
    pairs = len(serial.ranking())
    rows.append(("serial (this process)", seconds, True))
    start = time.perf_counter()
    ray.init(num_cpus=os.cpu_count(), include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR)
    ray_start = time.perf_counter() - start
    for workers in (1, 2):
        release_workers()  # each row pays its workers' start-up (model load), as a fresh job would
        result, seconds = timed_map(lm, work / f"ray{workers}", args, workers=workers)
        same = all(torch.equal(result.tensors[n].nan_to_num(-1), v.nan_to_num(-1)) for n, v in serial.tensors.items())
        rows.append((f"Ray, {workers} worker{'s' if workers > 1 else ''}", seconds, same))
    release_workers()
    ray.shutdown()
    shutil.rmtree(work, ignore_errors=True)

    base = rows[0][1]
    print(f"\nmap of {pairs} pairs on {lm.model_id} (k = {args.k}, {args.iterations} iterations), "
          f"{os.cpu_count()} cores; Ray start-up {ray_start:.1f} s (not in the rows)")
    print("| run | wall s | s / pair | speed-up vs serial | serial bits |\n|---|---|---|---|---|")
    for name, seconds, same in rows:
        print(f"| {name} | {seconds:.1f} | {seconds / pairs:.2f} | {base / seconds:.2f}× | {'yes' if same else 'NO'} |")

    # ---- estimate: a pair costs ≈ (iterations + 1) · 5k row-passes through the blocks up to the target.
    per_pair = base / pairs
    smol = next(c for c in CONFIGS if c.name.startswith("SmolLM2"))
    tokens = int(serial.config["tokens"])
    print(f"\nestimate (not measured): {POWER_STEERING_PAIRS} pairs (every pair of 36 blocks), k = {args.k}, "
          f"{args.iterations} iterations, one {tokens}-token prompt; serial CPU time scaled by FLOPs from "
          f"{per_pair:.2f} s / pair measured above; GPU: the larger of the FLOPs at {args.gpu_tflops:g} TFLOP/s "
          f"and the latency bound, {args.gpu_pair_seconds:g} s per pair of a {args.gpu_pair_blocks}-block model "
          "scaled by depth (small batches launch one kernel chain per block)")
    print("| model | FLOPs / pair | CPU serial (this machine) h | 8 GPUs min | 64 GPUs min |\n|---|---|---|---|---|")
    for name in ("Qwen2.5-7B", "Qwen2.5-14B"):
        c = next(x for x in CONFIGS if x.name == name)
        depth = c.layers * 2 / 3  # a pair's forward runs to its target: about 2/3 of the depth on average
        flops = (args.iterations + 1) * 5 * args.k * 2 * block_params(c) * depth * tokens
        ratio = (block_params(c) * c.layers) / (block_params(smol) * smol.layers)
        cpu_hours = per_pair * ratio * POWER_STEERING_PAIRS / 3600
        gpu_seconds = max(flops / (args.gpu_tflops * 1e12), args.gpu_pair_seconds * c.layers / args.gpu_pair_blocks)
        print(f"| {name} | {flops:.2e} | {cpu_hours:.0f} | {gpu_seconds * POWER_STEERING_PAIRS / 8 / 60:.1f} | "
              f"{gpu_seconds * POWER_STEERING_PAIRS / 64 / 60:.2f} |")


if __name__ == "__main__":
    main()
