"""The learner -> rollout weight-sync group on CPU (gloo), across real processes.

The tests that form a real group (the engines' channel: spawned processes, or waiting out its
timeout) are in the engine tier (setup.cfg's `engine` marker)."""
from __future__ import annotations

import multiprocessing as mp
import os
import time

os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from marl_llm.weight_sync import WeightSyncError, WeightSyncGroup, free_port, meta_of  # noqa: E402


def state_dict(seed: int = 0) -> list[tuple[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return [
        ("model.embed_tokens.weight", torch.randn(50, 8, generator=g)),
        ("model.layers.0.mlp.up_proj.weight", torch.randn(16, 8, generator=g)),
        ("model.norm.weight", torch.randn(8, generator=g).bfloat16()),
        ("scalar", torch.tensor(3.5)),
        ("model.layers.0.self_attn.q_proj.weight", torch.randn(8, 8, generator=g)[:, :4]),  # non-contiguous
        ("counts", torch.arange(7)),
    ]


def _send(port: int, world_size: int, seed: int, delay: float = 0.0, timeout_s: float = 60) -> None:
    torch.set_num_threads(1)
    time.sleep(delay)
    with WeightSyncGroup("127.0.0.1", port, 0, world_size, timeout_s=timeout_s) as g:
        g.broadcast(state_dict(seed))


def _recv(port: int, rank: int, world_size: int, q) -> None:
    torch.set_num_threads(1)
    try:
        with WeightSyncGroup("127.0.0.1", port, rank, world_size, timeout_s=60) as g:
            out = g.receive(meta_of(state_dict(0)))
            q.put((rank, [(n, t.clone()) for n, t in out]))
    except Exception as e:  # report to the test instead of dying silently
        q.put((rank, repr(e)))


def test_meta_of():
    meta = meta_of(state_dict())
    assert meta[0] == ("model.embed_tokens.weight", "float32", (50, 8))
    assert meta[2][1] == "bfloat16" and meta[3][2] == () and meta[5][1] == "int64"


@pytest.mark.engine
def test_broadcast_to_two_receivers_gives_identical_tensors():
    ctx = mp.get_context("spawn")
    port, q = free_port(), ctx.Queue()
    procs = [ctx.Process(target=_send, args=(port, 3, 0))]
    procs += [ctx.Process(target=_recv, args=(port, r, 3, q)) for r in (1, 2)]
    for p in procs:
        p.start()
    try:
        results = dict(q.get(timeout=120) for _ in (1, 2))
    finally:
        for p in procs:
            p.join(timeout=60)
    want = state_dict(0)
    for rank in (1, 2):
        got = results[rank]
        assert not isinstance(got, str), got
        assert [n for n, _ in got] == [n for n, _ in want]
        for (_, a), (_, b) in zip(got, want):
            assert a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    assert all(p.exitcode == 0 for p in procs)


@pytest.mark.engine
def test_receiver_in_this_process():
    """The sender (a spawned process) starts late; rank 1 here waits for it, then gets the data."""
    ctx = mp.get_context("spawn")
    port = free_port()
    p = ctx.Process(target=_send, args=(port, 2, 5, 1.0))
    p.start()
    try:
        with WeightSyncGroup("127.0.0.1", port, 1, 2, timeout_s=60) as g:
            got = g.receive(meta_of(state_dict(5)))
    finally:
        p.join(timeout=60)
    for (n, a), (m, b) in zip(got, state_dict(5)):
        assert n == m and torch.equal(a, b)


@pytest.mark.engine
def test_receiver_without_sender_times_out():
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="could not form the group"):
        WeightSyncGroup("127.0.0.1", free_port(), 1, 2, timeout_s=3)
    assert time.monotonic() - t0 < 30


@pytest.mark.engine
def test_sender_without_receivers_times_out():
    t0 = time.monotonic()
    with pytest.raises(WeightSyncError, match="rank 0/2"):
        WeightSyncGroup("127.0.0.1", free_port(), 0, 2, timeout_s=3)
    assert time.monotonic() - t0 < 30


@pytest.mark.engine
def test_wrong_meta_is_detected():
    ctx = mp.get_context("spawn")
    port = free_port()
    p = ctx.Process(target=_send, args=(port, 2, 0, 0.0, 10))  # its payload send will time out
    p.start()
    try:
        with WeightSyncGroup("127.0.0.1", port, 1, 2, timeout_s=30) as g:
            wrong = meta_of(state_dict(0))[:-1]
            with pytest.raises(WeightSyncError, match="do not match"):
                g.receive(wrong)
    finally:
        p.join(timeout=60)
        if p.is_alive():
            p.kill()
