"""Ray execution of independent tasks on one model: the same results as a serial run, on many processes.

    pool = RayPool.check(workers=2, address=None)       # local Ray with this machine's cores; or join a cluster
    pool.run(lm, task, items, on_result)                # task(lm, memo, item) for every item, on the workers

`task` is a module-level function of its caller (Ray sends it by name), so this module knows none of them:
melbo.jobs.layermap sends one (source, target) pair per item, melbo.jobs.sweep one (radius, layer pair) point. Each worker
keeps a `memo` dict for as long as it lives, where a task may keep what its items share (a map's tokenised
prompts). Each worker is a Ray actor that loads the model once, from its spec (an embedded name, a directory, a .gguf or
a hub id, as `load_model` takes it), and checks that it got the driver's model (same id). Tasks go to the
actors through `ray.util.ActorPool`; results come back in any order, and each is handed to `on_result` as it
arrives (the caller checkpoints it and reports progress). A task's result depends only on its item's own seed
and inputs, so the worker count and the completion order change nothing (bitwise on CPU).

A worker that dies is restarted by Ray (`max_restarts`), and its unfinished task is re-run there
(`max_task_retries`). A cluster needs melbo and the model on every node, and, for sweeps, a shared --out.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import Any, Callable, Optional, Sequence

import torch

from melbo.checks import check_whole
from melbo.errors import MelboError
from melbo.engine.models import LoadedModel, load_model
from melbo.threads import free_cores

RESTARTS = 3  # a worker may die this often (out of memory, a lost node) before the run fails
CONNECT_TIMEOUT = 3.0  # seconds to reach a --ray-address before giving up


def local_cores() -> int:
    """The cores this process may use (the affinity mask, not the machine's count)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


@dataclass(frozen=True)
class ModelSpec:
    """What a worker needs to load the driver's model by itself."""

    spec: str
    device: str
    dtype: str
    blocks_path: Optional[str]
    model_id: str
    system: Optional[str] = None  # the driver's system prompt: workers read the prompts as it does

    @classmethod
    def of(cls, lm: LoadedModel) -> "ModelSpec":
        device = "auto" if getattr(lm.model, "hf_device_map", None) else str(lm.device)
        return cls(lm.spec, device, str(lm.dtype).removeprefix("torch."), lm.blocks_path, lm.model_id, lm.system)

    def load(self) -> LoadedModel:
        lm = load_model(self.spec, device=self.device, dtype=self.dtype, blocks_path=self.blocks_path,
                        system=self.system)
        if lm.model_id != self.model_id:
            raise MelboError(f"worker loaded {lm.model_id} for {self.spec!r}, but the driver has {self.model_id}: "
                             "give every node the same model files")
        return lm


Task = Callable[[LoadedModel, dict, Any], Any]  # (the worker's model, its memo, one item) -> the item's result


class Worker:
    """A Ray actor's body: one loaded model, many tasks. `ray.remote` wraps it in `_actor_class`."""

    def __init__(self, spec: ModelSpec, threads: int):
        torch.set_num_threads(threads)
        self.lm = spec.load()
        self.memo: dict = {}  # what a task keeps between its items on this worker

    def run(self, task: Task, item: Any) -> Any:
        return task(self.lm, self.memo, item)

    def pid(self) -> int:
        return os.getpid()


_ACTOR = None


def _actor_class():
    global _ACTOR
    if _ACTOR is None:
        import ray

        _ACTOR = ray.remote(max_restarts=RESTARTS, max_task_retries=RESTARTS)(Worker)
    return _ACTOR


def check_address(address: str) -> None:
    """Fail fast on an address nothing listens at (ray.init would retry for a minute)."""
    text = address.strip()
    if text == "auto":
        return
    host, _, port = text.removeprefix("ray://").rpartition(":")
    if not host or not port.isdigit():
        raise MelboError(f"--ray-address {address!r} is not host:port: use e.g. 10.0.0.5:6379 or ray://head:10001")
    try:
        socket.create_connection((host, int(port)), timeout=CONNECT_TIMEOUT).close()
    except OSError as exc:
        raise MelboError(f"cannot reach a Ray cluster at {address} ({exc.strerror or exc}): start one with "
                         "`ray start --head` there, or check the address") from None


def check_request(workers: Optional[int], address: Optional[str]) -> None:
    """--workers and --ray-address, checked without starting Ray: a whole number ≤ the cores, a reachable address."""
    if workers is not None:
        check_whole("workers", workers)
        if workers < 1:
            raise MelboError(f"--workers must be ≥ 1, got {workers}")
    if address is not None:
        if not isinstance(address, str) or not address.strip():
            raise MelboError(f"--ray-address must be host:port, got {address!r}")
        check_address(address)
    elif workers is not None and workers > local_cores():
        raise MelboError(f"--workers {workers} is more than this machine's {local_cores()} cores: "
                         f"use at most {local_cores()}, or join a cluster with --ray-address")


class RayPool:
    """Ray workers for one job. `check` validates and connects; `run` does the work."""

    def __init__(self, workers: int, address: Optional[str], threads: int):
        self.workers, self.address, self.threads = workers, address, threads
        self.actors: list = []  # the live actor handles, while a job runs (a test kills one)

    @classmethod
    def check(cls, workers: Optional[int], address: Optional[str]) -> "RayPool":
        """Validate --workers against the cores (local) or the cluster's CPUs, and start or join Ray."""
        check_request(workers, address)
        cpus = _connect(address)
        workers = workers if workers is not None else cpus
        if workers > cpus:
            raise MelboError(f"--workers {workers} is more than the Ray cluster's {cpus} CPUs: use at most {cpus}")
        # Locally, each worker gets its share of the cores that are free now, not of every core: beside another
        # 2-thread torch job, two workers of 2 threads each oversubscribed 2 cores and a map ran 30× slower.
        threads = max(1, min(cpus, free_cores()) // workers) if address is None else 1
        if os.environ.get("OMP_NUM_THREADS", "").isdigit():  # the user's bound holds in the workers too: two
            threads = min(threads, max(1, int(os.environ["OMP_NUM_THREADS"])))  # busy cores × 2 threads crawl
        return cls(workers, address, threads)

    # ---- jobs
    def run(self, lm: LoadedModel, task: Task, items: Sequence[Any], on_result: Callable[[Any], None]) -> None:
        """`task(lm, memo, item)` for every item on the workers' copies of `lm`; `on_result` as each one finishes.

        `task` must be a module-level function (Ray pickles it by name) that depends only on its arguments.
        """
        if not items:
            return
        from ray.exceptions import RayError
        from ray.util import ActorPool

        self.actors = _workers(ModelSpec.of(lm), self.threads, min(self.workers, len(items)))
        try:
            for result in ActorPool(self.actors).map_unordered(lambda actor, item: actor.run.remote(task, item),
                                                               items):
                on_result(result)
        except RayError as exc:
            release_workers()
            cause = getattr(exc, "cause", None)
            if isinstance(cause, MelboError):
                raise cause from None
            raise MelboError(f"a Ray worker failed {RESTARTS} times ({_first_line(exc)}): finished results are "
                             "saved; run the same command with --resume to continue") from None
        except BaseException:  # an interrupted job: its workers may be mid-task, start afresh next time
            release_workers()
            raise


# Workers outlive a job within one Ray session: a sweep after a map (or a notebook's next call) reuses their
# loaded model instead of paying the actors' start-up again. Keyed by the Ray job, so a new ray.init starts afresh.
_WORKERS: dict[tuple, list] = {}


def _workers(spec: ModelSpec, threads: int, count: int) -> list:
    import ray

    key = (ray.get_runtime_context().get_job_id(), spec, threads)
    live = _WORKERS.setdefault(key, [])
    actor = _actor_class().options(num_cpus=threads)
    live += [actor.remote(spec, threads) for _ in range(count - len(live))]
    return live[:count]


def release_workers() -> None:
    """End the cached workers (their models' memory goes with them); the next job starts new ones."""
    import ray

    for actors in _WORKERS.values():
        for a in actors:
            ray.kill(a)
    _WORKERS.clear()


def _connect(address: Optional[str]) -> int:
    """Start local Ray with this machine's cores, or join `address`; return the CPUs Ray can schedule on."""
    from melbo.extras import require

    ray = require("ray")

    if not ray.is_initialized():
        quiet = dict(include_dashboard=False, log_to_driver=False, logging_level=logging.ERROR,
                     configure_logging=True)
        start = time.perf_counter()
        try:
            if address is None:
                ray.init(num_cpus=local_cores(), **quiet)
            else:
                ray.init(address=address.strip(), **quiet)
        except Exception as exc:  # Ray raises many types here (no cluster, a client without ray[client], ...)
            raise MelboError(f"cannot start or join Ray ({_first_line(exc)}, after {time.perf_counter() - start:.0f} s)"
                             ": check --ray-address, or leave it out to run locally") from None
    return int(ray.cluster_resources().get("CPU", 1))


def _first_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return lines[0][:200] if lines else type(exc).__name__
