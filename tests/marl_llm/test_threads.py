"""CPU core sharing between engine processes (runtime.compute_phase): a phase that runs alone
gets every core, concurrent phases split them, nobody oversubscribes."""
import os
import subprocess
import sys
import threading
import time

import pytest
import torch

from marl_llm import runtime


@pytest.fixture
def cores_dir(tmp_path, monkeypatch):
    monkeypatch.setenv(runtime.CORES_DIR_ENV, str(tmp_path))
    monkeypatch.setattr(runtime, "has_gpu", lambda: False)
    yield tmp_path
    runtime.set_threads(1)


def test_a_phase_alone_gets_every_core(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    with runtime.compute_phase(settle_s=0) as n:
        assert n == 4 and torch.get_num_threads() == 4
    assert torch.get_num_threads() == 1 and not list(cores_dir.iterdir())


def test_concurrent_phases_split_the_cores(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    got, barrier = [], threading.Barrier(2)

    def phase():
        with runtime.compute_phase(settle_s=0.2) as n:
            got.append(n)
            barrier.wait(timeout=10)  # both inside at once

    ts = [threading.Thread(target=phase) for _ in range(2)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert got == [2, 2]


def test_more_phases_than_cores_get_one_thread_each(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    for i in range(3):
        (cores_dir / f"{os.getpid()}.{i}").touch()
    assert runtime.phase_threads() == 1
    assert runtime.phase_threads(fixed=3) == 3  # learner.threads / rollout.threads pin it


def test_markers_of_dead_processes_do_not_count(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 2)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (cores_dir / f"{dead.pid}.1").touch()
    (cores_dir / "not-a-marker").touch()
    assert runtime.active_phases() == 0
    assert not (cores_dir / f"{dead.pid}.1").exists()
    with runtime.compute_phase(settle_s=0) as n:
        assert n == 2


def test_set_threads_survives_vllms_patch(cores_dir, monkeypatch):
    # vLLM's CPU worker replaces torch.set_num_threads with a no-op in its process
    monkeypatch.setattr(torch, "set_num_threads", lambda n: None)
    runtime.set_threads(2)
    assert torch.get_num_threads() == 2


def test_a_running_phase_takes_the_cores_another_phase_frees(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    monkeypatch.setenv(runtime.REBALANCE_ENV, "0.001")
    other = cores_dir / f"{os.getpid()}.other"
    other.touch()  # another engine computing
    with runtime.compute_phase(settle_s=0) as n:
        assert n == 2 and torch.get_num_threads() == 2
        other.unlink()  # ... finishes its batch
        time.sleep(0.01)
        assert runtime.rebalance() == 4 and torch.get_num_threads() == 4
        other.touch()  # ... and starts the next one
        time.sleep(0.01)
        assert runtime.rebalance() == 2 and torch.get_num_threads() == 2
    assert runtime.rebalance() == 0 and torch.get_num_threads() == 1  # outside a phase: nothing to do


def test_rebalancing_is_rate_limited_and_can_be_turned_off(cores_dir, monkeypatch):
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    other = cores_dir / f"{os.getpid()}.other"
    other.touch()
    for interval in ("3600", "0"):  # not due yet; off
        monkeypatch.setenv(runtime.REBALANCE_ENV, interval)
        with runtime.compute_phase(settle_s=0) as n:
            other.unlink(missing_ok=True)
            assert n == 2 and runtime.rebalance() == 2 and torch.get_num_threads() == 2
        other.touch()
    with runtime.compute_phase(fixed=3) as n:  # a pinned count stays pinned
        other.unlink()
        assert n == 3 and runtime.rebalance() == 3
