"""How many threads torch should use: the cores that are free now, not every core the machine has.

Why: torch's default is one thread per core, and every parallel region waits for its slowest thread. With one
ordinary busy process on the other core of a 2-core machine, a 2-thread training loop ran 2.9× slower than idle,
a 1-thread loop only 1.8× slower; beside other torch processes, 7× slower (issue 14). So "auto" counts the cores
this process may run on (its affinity set) that are not kept busy by someone else, sampled over a short window;
hyperthread siblings count as one core, as torch's own default does.

A core counts as busy when it spent more than half of the window outside idle (niced work included: a low-priority
torch job beside melbo slowed it down as much as any other). This process's own CPU time in the window is
subtracted, so that melbo's idle worker threads never count against it. `OMP_NUM_THREADS`, when set, is the
user's explicit choice and wins over the measurement.
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Optional

from melbo.checks import is_whole
from melbo.errors import MelboError
from melbo.settings import THREADS

WINDOW = 0.2  # seconds of CPU counters sampled: 20 scheduler ticks per core at the usual USER_HZ of 100
BUSY = 0.5  # a core busy for more than this fraction of the window is not free


def allowed_cores() -> list[int]:
    """The cores this process may run on (its affinity set; all cores where the OS cannot say)."""
    try:
        return sorted(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return list(range(os.cpu_count() or 1))


def physical_cores(allowed: list[int]) -> list[list[int]]:
    """The allowed logical CPUs grouped by physical core (hyperthread siblings together), as torch counts cores."""
    groups: dict[str, list[int]] = {}
    for cpu in allowed:
        try:
            key = Path(f"/sys/devices/system/cpu/cpu{cpu}/topology/thread_siblings_list").read_text().strip()
        except OSError:
            key = str(cpu)
        groups.setdefault(key, []).append(cpu)
    return list(groups.values())


def _cpu_times() -> dict[int, tuple[float, float]]:
    """Per logical CPU: (seconds not idle, all seconds) since boot (psutil: /proc/stat on Linux, the OS's own
    counters elsewhere)."""
    import psutil

    times = {}
    for cpu, t in enumerate(psutil.cpu_times(percpu=True)):
        fields = t._asdict()
        # guest time is already inside user and nice on Linux: counting it again would inflate "busy"
        total = sum(v for k, v in fields.items() if k not in ("guest", "guest_nice"))
        idle = fields.get("idle", 0.0) + fields.get("iowait", 0.0)
        times[cpu] = (total - idle, total)
    return times


def core_busy(window: float = WINDOW) -> tuple[dict[int, float], float]:
    """(busy fraction per core over `window` seconds, this process's own CPU use in cores over that window)."""
    before, own_before = _cpu_times(), time.process_time()
    time.sleep(window)
    after, own_after = _cpu_times(), time.process_time()
    busy = {}
    for core, (used, total) in after.items():
        used0, total0 = before.get(core, (used, total))
        busy[core] = (used - used0) / (total - total0) if total > total0 else 0.0
    return busy, (own_after - own_before) / window


def count_free(busy: dict[int, float], cores: list[list[int]], own: float = 0.0) -> int:
    """Physical cores (lists of logical CPUs) not kept busy by other processes.

    A core is busy when any of its logical CPUs is (a busy hyperthread sibling halves what a thread gets); of the
    busy ones, as many as this process itself kept busy are given back.
    """
    busy_cores = sum(1 for cpus in cores if any(busy.get(cpu, 0.0) > BUSY for cpu in cpus))
    others = max(0, busy_cores - round(own))
    return len(cores) - others


def free_cores(window: float = WINDOW) -> int:
    """How many physical cores of this process's affinity set are free now (measured; may be 0)."""
    cores = physical_cores(allowed_cores())
    try:
        busy, own = core_busy(window)
    except (OSError, ValueError, RuntimeError):  # counters unreadable: assume the affinity set is free, as torch does
        return len(cores)
    return count_free(busy, cores, own)


def auto_threads() -> int:
    """The thread count "auto" means: OMP_NUM_THREADS when the user set it, else the free cores (at least 1)."""
    env = os.environ.get("OMP_NUM_THREADS", "").strip()
    if env.isdigit() and int(env) >= 1:
        return min(int(env), len(allowed_cores()))
    return max(1, free_cores())


def check_threads(n: object) -> None:
    cores = len(allowed_cores())
    if not is_whole(n) or not 1 <= n <= cores:
        raise MelboError(f"threads must be a whole number from 1 to {cores} (the cores this process may use), "
                         f"got {n!r}: omit it to use the free cores")


def configure_threads(n: Optional[int] = THREADS) -> int:
    """Set torch's intra-op thread count: `n`, or "auto" (`auto_threads`) when None. Returns the count set.

    Process-wide (torch has one thread pool), hence a call of its own rather than a model-loading option.
    """
    import torch

    if n is not None:
        check_threads(n)
    chosen = auto_threads() if n is None else n
    torch.set_num_threads(chosen)
    return chosen
