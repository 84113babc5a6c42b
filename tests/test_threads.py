"""melbo.threads: torch's thread count from the cores that are free (affinity and measured load)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest
import torch

from conftest import run_cli
from melbo.errors import MelboError
from melbo.threads import (
    allowed_cores, auto_threads, configure_threads, core_busy, count_free, free_cores, physical_cores)


@pytest.fixture
def restore_threads():
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.fixture
def spinner():
    """A pure-Python busy loop at normal priority, pinned to the last allowed core; stopped by its pid."""
    core = allowed_cores()[-1]
    proc = subprocess.Popen([sys.executable, "-c", "while True: pass"],
                            preexec_fn=lambda: os.sched_setaffinity(0, {core}))
    try:
        time.sleep(0.3)  # let it start spinning
        yield core
    finally:
        proc.kill()
        proc.wait()


def test_count_free_leaves_out_busy_cores_not_our_own():
    busy = {0: 0.95, 1: 0.10, 2: 0.60, 3: 1.0}
    assert count_free(busy, [[0], [1], [2], [3]]) == 1
    assert count_free(busy, [[1], [2]]) == 1  # cores outside the affinity set do not count
    assert count_free(busy, [[0], [1], [2], [3]], own=1.0) == 2  # one busy core was this process's own threads
    assert count_free(busy, [[0], [1]], own=3.0) == 2  # never more free cores than allowed ones
    assert count_free({0: 0.5}, [[0]]) == 1  # exactly half busy is still free
    assert count_free(busy, [[0, 1], [2, 3]]) == 0  # hyperthread siblings: a busy sibling makes the core busy
    assert count_free({0: 0.9}, [[0, 2], [1, 3]]) == 1


def test_physical_cores_group_every_allowed_cpu_once():
    allowed = allowed_cores()
    groups = physical_cores(allowed)
    assert sorted(cpu for group in groups for cpu in group) == allowed
    assert 1 <= len(groups) <= len(allowed)


def test_a_busy_process_pinned_to_a_core_makes_it_not_free(spinner):
    busy, own = core_busy(0.2)
    assert busy[spinner] > 0.5
    assert own < 0.5  # the spinner is another process: not counted as ours
    assert free_cores() <= len(physical_cores(allowed_cores())) - 1


def test_configure_threads_sets_torch(restore_threads):
    assert configure_threads(1) == 1
    assert torch.get_num_threads() == 1


def test_auto_uses_free_cores_or_the_users_omp_setting(monkeypatch, restore_threads):
    monkeypatch.delenv("OMP_NUM_THREADS", raising=False)
    chosen = configure_threads(None)
    assert 1 <= chosen <= len(allowed_cores())
    assert torch.get_num_threads() == chosen
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert auto_threads() == 1


@pytest.mark.parametrize("bad", [0, -1, len(allowed_cores()) + 1, 1.5, "2", True])
def test_bad_thread_counts_are_refused(bad, restore_threads):
    with pytest.raises(MelboError, match="threads must be a whole number from 1 to"):
        configure_threads(bad)


def test_cli_threads_option_refuses_bad_values(capsys):
    code, _, err = run_cli(["sweep", "Hello", "--threads", "0"], capsys)
    assert code == 2
    assert "threads must be a whole number" in err and len(err.strip().splitlines()) == 1
