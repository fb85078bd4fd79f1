"""The process group that carries learner -> rollout weight pushes.

A dedicated group, independent of DeepSpeed's: rank 0 is the learner's rank 0 (it hosts the
`TCPStore` and owns the full state dict after the ZeRO-3 gather), ranks 1..N are rollout workers.

    # learner rank 0                                  # every rollout worker (rank r >= 1)
    g = WeightSyncGroup(addr, port, 0, N + 1, t)      g = WeightSyncGroup(addr, port, r, N + 1, t)
    meta = meta_of(named)          -- driver passes meta to the workers (Ray) -->
    g.broadcast(named)                                named = g.receive(meta)

The payload is ONE flat buffer per dtype (one collective per dtype instead of one per tensor),
preceded by a fixed-size header (a checksum of `meta`, tensor/dtype/element counts) so a worker
that was handed the wrong meta fails with a clear error instead of reading garbage.

Backends:
- "gloo" (CPU, tested): `torch.distributed.TCPStore` + `ProcessGroupGloo(store, rank, size,
  timeout)`, public torch API, no global `init_process_group` state, so it coexists with DeepSpeed.
- "nccl" (GPU, NOT testable on the CPU machines this was written on): the same store with
  `ProcessGroupNCCL`; tensors live on the current CUDA device. Kept deliberately small.

Every step has a timeout: constructing the group (the peers never show up), and each
collective (a peer died). Timeouts raise `WeightSyncError` naming the rank and the step.
"""
from __future__ import annotations

import logging
import socket
import time
import zlib
from datetime import timedelta
from typing import Iterable, Sequence

import torch

log = logging.getLogger(__name__)

Meta = list[tuple[str, str, tuple[int, ...]]]


class WeightSyncError(TimeoutError):
    """A weight push failed or timed out (a peer never joined, died, or got other meta)."""


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that is free right now on `host` (for the rank-0 TCPStore)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, 0))
        return s.getsockname()[1]


def node_addr_and_free_port() -> tuple[str, int]:
    """This node's address as Ray sees it and a port free on all its interfaces right now (the
    rendezvous of a DeepSpeed group or a weight-sync group hosted here)."""
    import ray
    return ray.util.get_node_ip_address(), free_port("")


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def str_dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise ValueError(f"unknown dtype {name!r} in weight meta")
    return dt


def meta_of(named_tensors: Iterable[tuple[str, torch.Tensor]]) -> Meta:
    """(name, dtype string, shape) per tensor, in order: what receivers need to allocate."""
    return [(n, dtype_str(t.dtype), tuple(t.shape)) for n, t in named_tensors]


def _numel(shape: Sequence[int]) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def _dtype_groups(meta: Meta) -> dict[str, list[int]]:
    """dtype -> indices into meta, dtypes in order of first appearance (same on every rank)."""
    groups: dict[str, list[int]] = {}
    for i, (_, dt, _) in enumerate(meta):
        groups.setdefault(dt, []).append(i)
    return groups


def _checksum(meta: Meta) -> int:
    canon = repr([(n, d, tuple(int(x) for x in s)) for n, d, s in meta]).encode()
    return zlib.crc32(canon)


class WeightSyncGroup:
    """A `world_size`-rank broadcast group for weights; rank 0 sends, the others receive."""

    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float = 300.0, backend: str = "gloo"):
        if backend not in ("gloo", "nccl"):
            raise ValueError(f"weight sync backend {backend!r}: choose 'gloo' (CPU) or 'nccl' (GPU)")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world_size {world_size}")
        self.rank, self.world_size, self.backend = rank, world_size, backend
        self.timeout = timedelta(seconds=float(timeout_s))
        self.where = f"weight sync group {master_addr}:{master_port} rank {rank}/{world_size}"
        from torch.distributed import TCPStore

        t0 = time.perf_counter()
        try:
            # the master binds the port; clients retry connecting until `timeout`
            self.store = TCPStore(master_addr, int(master_port), world_size, rank == 0,
                                  timeout=self.timeout, wait_for_workers=False)
            self.pg = self._make_pg()
            # the process group is lazy about peers: a barrier proves everybody is here
            self._wait(self.pg.barrier(), "joining (barrier)")
        except WeightSyncError:
            raise
        except Exception as e:  # TCPStore/gloo raise RuntimeError/DistStoreError on timeouts
            raise WeightSyncError(f"{self.where}: could not form the group within "
                                  f"{timeout_s:.0f}s ({type(e).__name__}: {e})") from e
        log.info("%s ready (%s) in %.2fs", self.where, backend, time.perf_counter() - t0)

    # ---- construction ----------------------------------------------------------------------
    def _make_pg(self):
        if self.backend == "gloo":
            from torch.distributed import ProcessGroupGloo
            return ProcessGroupGloo(self.store, self.rank, self.world_size, self.timeout)
        # ---- GPU only (untested here): NCCL over the same store -----------------------------
        from torch.distributed import ProcessGroupNCCL
        opts = ProcessGroupNCCL.Options()
        opts._timeout = self.timeout
        return ProcessGroupNCCL(self.store, self.rank, self.world_size, opts)

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", torch.cuda.current_device()) if self.backend == "nccl" \
            else torch.device("cpu")

    def _wait(self, work, what: str) -> None:
        try:
            ok = work.wait(self.timeout)
        except Exception as e:
            raise WeightSyncError(f"{self.where}: {what} failed or timed out after "
                                  f"{self.timeout.total_seconds():.0f}s ({type(e).__name__}: {e})") from e
        if ok is False:
            raise WeightSyncError(f"{self.where}: {what} timed out after {self.timeout.total_seconds():.0f}s")

    def _bcast(self, tensor: torch.Tensor, what: str) -> None:
        from torch.distributed import BroadcastOptions
        opts = BroadcastOptions()
        opts.rootRank, opts.rootTensor, opts.timeout = 0, 0, self.timeout
        self._wait(self.pg.broadcast([tensor], opts), what)

    def _header(self, meta: Meta) -> torch.Tensor:
        # fixed size on every rank whatever the meta: gloo aborts the process on a size mismatch
        total = sum(_numel(s) for _, _, s in meta)
        return torch.tensor([_checksum(meta), len(meta), len(_dtype_groups(meta)), total],
                            dtype=torch.int64, device=self.device)

    # ---- rank 0 ----------------------------------------------------------------------------
    def broadcast(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> Meta:
        """Send a full state dict to every other rank; returns its meta. Rank 0 only."""
        if self.rank != 0:
            raise RuntimeError(f"{self.where}: only rank 0 broadcasts; call receive(meta)")
        named = list(named_tensors)
        meta = meta_of(named)
        t0 = time.perf_counter()
        self._bcast(self._header(meta), "header broadcast")
        nbytes = 0
        for dt, idx in _dtype_groups(meta).items():
            flat = torch.cat([named[i][1].detach().reshape(-1).to(self.device) for i in idx])
            nbytes += flat.numel() * flat.element_size()
            self._bcast(flat, f"{dt} payload broadcast ({flat.numel()} elements)")
        log.info("%s: broadcast %d tensors, %.1f MB in %.3fs", self.where, len(named),
                 nbytes / 2**20, time.perf_counter() - t0)
        return meta

    # ---- ranks 1..N ------------------------------------------------------------------------
    def receive(self, meta: Meta) -> list[tuple[str, torch.Tensor]]:
        """Receive the state dict rank 0 broadcasts; `meta` is what rank 0's `meta_of` returned."""
        if self.rank == 0:
            raise RuntimeError(f"{self.where}: rank 0 sends; call broadcast(named_tensors)")
        meta = [(n, d, tuple(int(x) for x in s)) for n, d, s in meta]
        expect = self._header(meta)
        got = torch.empty_like(expect)
        self._bcast(got, "header broadcast")
        if not torch.equal(got.cpu(), expect.cpu()):
            raise WeightSyncError(f"{self.where}: the sender's tensors do not match the meta this "
                                  f"rank was given (header {got.tolist()} != {expect.tolist()})")
        out: list = [None] * len(meta)
        for dt, idx in _dtype_groups(meta).items():
            total = sum(_numel(meta[i][2]) for i in idx)
            flat = torch.empty(total, dtype=str_dtype(dt), device=self.device)
            self._bcast(flat, f"{dt} payload broadcast ({total} elements)")
            off = 0
            for i in idx:
                name, _, shape = meta[i]
                k = _numel(shape)
                out[i] = (name, flat[off:off + k].view(shape))
                off += k
        return out

    def close(self) -> None:
        """Drop the group (idempotent). The TCPStore closes with its last reference."""
        pg, self.pg, self.store = getattr(self, "pg", None), None, None
        if pg is not None and self.backend == "nccl":
            try:
                pg.abort()  # GPU only: free the NCCL communicator now
            except Exception:  # best effort at teardown
                pass

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
