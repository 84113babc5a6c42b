"""The GPU benchmark of issue 25, as one prepared script: run it once on a machine with a CUDA GPU.

1. Training: the seed's `SteeredModel`, `BatchedMELBO` and melbo on the same GPU, Qwen2.5-Coder-0.5B in bf16
   (`benchmarks/peers.py --device cuda --dtype bfloat16`): vector-steps/s, the ratios, the objective each reached
   under one fp32 reference, and each system's peak GPU memory.
2. Generation: steered greedy generation with fp32 and bf16 weights (`benchmarks/generation_precision.py --device
   cuda`): row-tokens/s and how often the text changes.

Absolute times count on a GPU (on a CPU only ratios do). Needs the Qwen weights (`make models-extra`) and no
network; `--model` takes any other. On a machine without CUDA it says so and exits 0, so that it can sit in a
script that also runs on CPUs.

    .venv/bin/python benchmarks/gpu_bench.py [--model qwen2.5-coder-0.5b] [--steps 30] [--out gpu-bench]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="qwen2.5-coder-0.5b")
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--vectors", type=int, default=32, help="vectors for BatchedMELBO and melbo")
    parser.add_argument("--out", type=Path, default=Path("gpu-bench"), help="peers.json and the logs go here")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("gpu_bench.py: no CUDA GPU here; nothing to measure (run it where one is)")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    print(f"GPU: {torch.cuda.get_device_name(0)}, torch {torch.__version__}")
    # Qwen2.5-Coder-0.5B has 24 blocks: melbo's default pair for its depth, and R in its residual scale (~20 at 6).
    stages = [
        ("training", [HERE / "peers.py", "--model", args.model, "--device", "cuda", "--dtype", "bfloat16",
                      "--precisions", "auto", "--source", "8", "--target", "16", "--radius", "8",
                      "--steps", str(args.steps), "--vectors", str(args.vectors), "--json", args.out / "peers.json"]),
        ("generation", [HERE / "generation_precision.py", "--model", args.model, "--device", "cuda",
                        "--vectors", str(args.vectors), "--batch-size", "128"]),
    ]
    failed = []
    for name, command in stages:
        started = time.perf_counter()
        result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True)
        (args.out / f"{name}.log").write_text(result.stdout + result.stderr)
        print(f"\n== {name} ({time.perf_counter() - started:.0f} s, exit {result.returncode})\n{result.stdout}")
        if result.returncode != 0:
            print(result.stderr[-3000:])
            failed.append(name)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
