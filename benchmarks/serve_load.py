"""`melbo serve` under load: many browser-like clients at once against a real server process, on a tiny model.

Builds a tiny random model, a real run of it (a few vectors, short completions) and a catalogue in a temporary
directory, starts `melbo serve` on them in a subprocess, then runs `--clients` threads (httpx) for `--seconds`,
each looping over a weighted mix of requests:

    browse   GET /, a run's page, a behaviour's page, a plot
    search   GET /search?q=…
    live     POST /api/runs/N/live, a few tokens, read to the end of the stream (latency = the whole stream)
    label    POST /behaviours/N/label with the CSRF token (a catalogue write)

Prints p50/p95 latency per kind, the error count (any status other than the expected, a 500, a dropped
connection: the goal is 0), how often the live queue was full (503 "busy": the server's designed push-back,
counted apart), and the server's RSS before and after. This is a measurement to read, not a timed test.

    .venv/bin/python benchmarks/serve_load.py                 # 50 clients, 120 s
    .venv/bin/python benchmarks/serve_load.py --seconds 20    # a quick run
"""

from __future__ import annotations

import argparse
import os
import random
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]
KINDS = {"browse": 0.45, "search": 0.2, "live": 0.15, "label": 0.2}  # shares of each client's requests
WORDS = ["the", "sea", "Hello", "ship", "a", "zzz-no-hit", "<script>", "pirate"]


def build(base: Path) -> tuple[Path, int, list[int]]:
    """A tiny model, a real run of it and a catalogue: (catalogue, run id, behaviour ids)."""
    sys.path.insert(0, str(ROOT / "tests"))
    from tiny_models import save_tiny_model  # the tests' tiny random model with a byte-level tokenizer

    import melbo
    from melbo.records.catalog import Catalog

    lm = melbo.load_model(str(save_tiny_model(base / "model")))
    run = melbo.elicit(lm, ["Hello there"], base / "run", random=2, n_vectors=4, steps=3, radius="1.0",
                       max_new_tokens=8)
    with Catalog(base / "catalog.sqlite") as catalog:
        run_id = catalog.add_run(run.path)
        ids = [p.id for p in catalog.perturbations(run_id)]
    return base / "catalog.sqlite", run_id, ids


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def start_server(catalog: Path, port: int) -> subprocess.Popen:
    """`melbo serve` in its own process (the same virtualenv), ready when its home page answers."""
    melbo = shutil.which("melbo", path=str(Path(sys.executable).parent)) or "melbo"
    env = {**os.environ, "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}  # the clients need CPU too
    server = subprocess.Popen([melbo, "serve", "--catalog", str(catalog), "--port", str(port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise SystemExit(f"melbo serve exited with {server.returncode}: {server.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"http://127.0.0.1:{port}/", timeout=2).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    server.kill()
    raise SystemExit("melbo serve did not answer within 120 s")


def rss_mb(pid: int) -> float:
    try:
        import psutil

        return psutil.Process(pid).memory_info().rss / 2 ** 20
    except ImportError:  # Linux without psutil: the kernel's own count, in kB
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return float("nan")


class Load:
    """What every client thread records: latencies per kind, errors with a sample of what went wrong."""

    def __init__(self):
        self.lock = threading.Lock()
        self.times: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, int] = defaultdict(int)
        self.busy = 0
        self.samples: list[str] = []

    def record(self, kind: str, seconds: float, problem: str | None = None, busy: bool = False) -> None:
        with self.lock:
            if busy:
                self.busy += 1
            elif problem is not None:
                self.errors[kind] += 1
                if len(self.samples) < 5:
                    self.samples.append(f"{kind}: {problem}")
            else:
                self.times[kind].append(seconds)


def one_request(client: httpx.Client, kind: str, rng: random.Random, site: dict) -> tuple[int, bool]:
    """Send one request of `kind`; returns (status, whether the status is the one expected)."""
    run_id, ids = site["run_id"], site["ids"]
    if kind == "browse":
        path = rng.choice(["/", f"/runs/{run_id}", f"/behaviours/{rng.choice(ids)}",
                           f"/runs/{run_id}/plots/{rng.choice(['curves', 'learned-vs-random'])}.png"])
        status = client.get(path).status_code
        return status, status == 200
    if kind == "search":
        status = client.get("/search", params={"q": rng.choice(WORDS)}).status_code
        return status, status == 200
    if kind == "label":
        form = {"label": f"load {rng.randint(0, 999)}", "note": "written by serve_load", "csrf": site["csrf"]}
        status = client.post(f"/behaviours/{rng.choice(ids)}/label", data=form).status_code
        return status, status == 303
    body = {"prompt": "Hello there", "perturbations": rng.sample(range(len(ids)), 2), "scale": 1.0,
            "max_new_tokens": 6, "random": rng.random() < 0.3}
    with client.stream("POST", f"/api/runs/{run_id}/live", json=body,
                       headers={"X-CSRF-Token": site["csrf"]}) as response:
        lines = [line for line in response.iter_lines() if line.strip()]
    finished = response.status_code == 200 and bool(lines) and '"done"' in lines[-1]
    return response.status_code, finished


def client_loop(url: str, seconds: float, seed: int, site: dict, load: Load) -> None:
    rng = random.Random(seed)
    kinds, weights = list(KINDS), list(KINDS.values())
    deadline = time.monotonic() + seconds
    with httpx.Client(base_url=url, timeout=60, follow_redirects=False) as client:
        while time.monotonic() < deadline:
            kind = rng.choices(kinds, weights)[0]
            start = time.perf_counter()
            try:
                status, expected = one_request(client, kind, rng, site)
            except httpx.HTTPError as exc:
                load.record(kind, 0.0, f"{type(exc).__name__}: {exc}")
                continue
            elapsed = time.perf_counter() - start
            if kind == "live" and status == 503:
                load.record(kind, elapsed, busy=True)
            else:
                load.record(kind, elapsed, None if expected else f"status {status}")


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0, help="how long the clients run")
    parser.add_argument("--clients", type=int, default=50, help="concurrent clients (threads)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="melbo-serve-load-") as tmp:
        catalog, run_id, ids = build(Path(tmp))
        port = free_port()
        server = start_server(catalog, port)
        url = f"http://127.0.0.1:{port}"
        try:
            page = httpx.get(f"{url}/runs/{run_id}", timeout=30).text
            csrf = re.search(r'name="csrf-token" content="([^"]+)"', page).group(1)
            site = {"run_id": run_id, "ids": ids, "csrf": csrf}
            # one of each kind first: the model loads, the plots render, before RSS is read
            with httpx.Client(base_url=url, timeout=120) as client:
                for kind in KINDS:
                    one_request(client, kind, random.Random(args.seed), site)
            before = rss_mb(server.pid)
            load = Load()
            series: list[float] = []  # RSS every 5 s: growth that keeps on is a leak, a step at the start is not
            sampler = threading.Thread(target=sample_rss, args=(server.pid, args.seconds, series), daemon=True)
            sampler.start()
            threads = [threading.Thread(target=client_loop, args=(url, args.seconds, args.seed * 1000 + k, site,
                                                                  load)) for k in range(args.clients)]
            started = time.perf_counter()
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join()
            wall = time.perf_counter() - started
            after = rss_mb(server.pid)
        finally:
            server.send_signal(signal.SIGINT)
            try:
                server.wait(15)
            except subprocess.TimeoutExpired:
                server.kill()
    report(load, args, wall, before, after, series)


def sample_rss(pid: int, seconds: float, series: list[float]) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        time.sleep(min(5.0, max(deadline - time.monotonic(), 0.0)))
        series.append(rss_mb(pid))


def report(load: Load, args, wall: float, before: float, after: float, series: list[float]) -> None:
    total = sum(len(v) for v in load.times.values())
    errors = sum(load.errors.values())
    print(f"melbo serve under load: {args.clients} clients for {args.seconds:g} s (wall {wall:.1f} s), "
          f"tiny model, {len(os.sched_getaffinity(0))} of {os.cpu_count()} CPUs")
    print(f"{'kind':<8} | {'requests':>8} | {'p50 ms':>8} | {'p95 ms':>8} | {'errors':>6}")
    for kind in KINDS:
        times = load.times.get(kind, [])
        print(f"{kind:<8} | {len(times):>8} | {percentile(times, 0.5) * 1000:>8.1f} | "
              f"{percentile(times, 0.95) * 1000:>8.1f} | {load.errors.get(kind, 0):>6}")
    print(f"requests answered: {total} ({total / wall:.1f}/s); errors: {errors} (goal 0); "
          f"live refused as busy (503, the queue's push-back): {load.busy}")
    print(f"server RSS: {before:.0f} MB before, {after:.0f} MB after ({after - before:+.0f} MB); every 5 s: "
          + " ".join(f"{mb:.0f}" for mb in series))
    if len(series) >= 4:  # a leak keeps growing; the allocator's and the threads' warm-up is a step that stops
        half = series[len(series) // 2:]
        print(f"second half (steady state): {half[0]:.0f} → {half[-1]:.0f} MB ({half[-1] - half[0]:+.0f} MB), "
              f"peak {max(series):.0f} MB")
    for sample in load.samples:
        print("  e.g.", sample)


if __name__ == "__main__":
    main()
