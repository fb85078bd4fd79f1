"""Policy: the one handle algorithms use for an LLM — generate, score, train, in engine-neutral terms.

Behind it sit the policy's rollout workers (Ray actors running vLLM or HF generation) and, for a
trainable policy, its learner group (Ray actors forming one DeepSpeed ZeRO-3 group). Algorithms
never see Ray, DeepSpeed or vLLM: they call the methods below with marl_llm.types objects.
"""
from __future__ import annotations

import logging
import threading
import time
import weakref
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Mapping, Optional, Sequence

from marl_llm.config import LearnerConfig, ModelConfig
from marl_llm.deadlines import Deadline
from marl_llm.losses import LossConfig
from marl_llm.types import Completion, GenerationRequest, PairSample, Sample

log = logging.getLogger(__name__)


@dataclass
class PolicySpec:
    """What an algorithm asks the framework to build: one LLM, trainable or frozen."""

    name: str
    model: ModelConfig
    trainable: bool = True
    learner: Optional[LearnerConfig] = None  # per-policy learner settings; default: the run's
    reference: bool = False  # keep a frozen reference copy (KL penalties, DPO)


class ActorFailed(RuntimeError):
    """A rollout worker or learner rank failed, died or hung; the message names it."""


class ActorHung(ActorFailed):
    """A remote call outlived its deadline (the actor is stopped, stuck, or its node is gone)."""


def actor_label(actor) -> str:
    """A Ray actor's id for messages (matches `ray list actors`); '?' for non-Ray stand-ins."""
    actor_id = getattr(actor, "_actor_id", None)
    return actor_id.hex()[:12] if actor_id is not None else "?"


def describe_failure(e: BaseException) -> str:
    """One line for an exception out of `ray.get`: a remote exception's own type and first line
    (not Ray's wrapper with the remote traceback), or e.g. `ActorDiedError: The actor died ...`."""
    cause = getattr(e, "cause", None)
    if isinstance(cause, BaseException):
        e = cause
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def request_tokens(requests: Sequence[GenerationRequest]) -> int:
    """The most tokens a generate call may produce: every request's n x max_tokens."""
    return sum(r.sampling.n * r.sampling.max_tokens for r in requests)


class Pending:
    """An in-flight generation; `result()` blocks. Lets algorithms dispatch many policies at once.

    Each worker's call has a deadline (`Deadline`, sized from its tokens when not set): a worker
    that does not answer in time (stopped, stuck, its node gone) raises `ActorHung` naming it.
    `result()` may be called again (and from another thread: a weight push waiting for the call,
    `wait_for_generations`); the completions are fetched once."""

    def __init__(self, refs: list, splits: list[list[int]], n_requests: int, get, names: Optional[list[str]] = None,
                 tokens: Optional[list[int]] = None, deadline: Optional[Deadline] = None, workers: Sequence = ()):
        self._refs, self._splits, self._n, self._get = refs, splits, n_requests, get
        self._names = names or [f"rollout worker {i}" for i in range(len(refs))]
        self._tokens = tokens or [0] * len(refs)
        self._deadline = deadline
        self._started = time.monotonic()
        self._lock = threading.Lock()
        self._out: Optional[list[list[Completion]]] = None
        self.workers = {id(w) for w in workers}
        if self.workers:
            _IN_FLIGHT.add(self)

    def result(self) -> list[list[Completion]]:
        with self._lock:
            if self._out is None:
                self._out = self._fetch()
                _IN_FLIGHT.discard(self)
            return self._out

    def _fetch(self) -> list[list[Completion]]:
        out: list[Any] = [None] * self._n
        for ref, idx, name, tokens in zip(self._refs, self._splits, self._names, self._tokens):
            limit = self._deadline.seconds(tokens) if self._deadline else None
            wait = None if limit is None else max(0.0, self._started + limit - time.monotonic())
            try:
                comps = self._get(ref, timeout=wait)
            except Exception as e:  # a dead actor (kill -9, OOM), an engine error, or no answer in time
                if type(e).__name__ == "GetTimeoutError":
                    raise ActorHung(f"{name} hung in generate: {self._deadline.describe(limit)}") from None
                raise ActorFailed(f"generate failed on {name}: {describe_failure(e)}") from e
            if self._deadline:
                self._deadline.observe(sum(len(c.completion_ids) for cs in comps for c in cs),
                                       time.monotonic() - self._started)
            for i, comps_i in zip(idx, comps):
                out[i] = comps_i
        return out


# generate calls dispatched and not yet collected (weak: a call nobody collects is forgotten with its handle)
_IN_FLIGHT: "weakref.WeakSet[Pending]" = weakref.WeakSet()


def wait_for_generations(workers: Sequence) -> None:
    """Wait for the generate calls in flight on `workers` (each within its own generate deadline;
    a hung or dead worker raises the error its caller would get). A rollout worker loads new
    weights only after the call it is running, so a push waits for those calls first and its own
    deadline (learner.timeout_s) then covers the push alone, however long the generation was."""
    ids = {id(w) for w in workers}
    for pending in [p for p in list(_IN_FLIGHT) if p.workers & ids]:
        pending.result()


class TrainPending:
    """An in-flight optimiser step; `result()` blocks and returns its metrics."""

    def __init__(self, wait: Callable[[], dict[str, float]]):
        self._wait: Optional[Callable[[], dict[str, float]]] = wait
        self._out: Optional[dict[str, float]] = None

    def result(self) -> dict[str, float]:
        if self._wait is not None:
            self._out, self._wait = self._wait(), None
        return self._out


class TrainGate:
    """The engine's rule for the train steps of several policies (`learner.concurrent`): when
    off, a step is dispatched only after every other policy's pending step has finished, so one
    learner group computes at a time (memory); when on, they overlap."""

    def __init__(self, concurrent: bool = False):
        self.concurrent = concurrent
        self._inflight: list[TrainPending] = []

    def dispatch(self, start: Callable[[], Callable[[], dict[str, float]]]) -> TrainPending:
        if not self.concurrent:
            for p in self._inflight:
                p.result()
            self._inflight.clear()
        pending = TrainPending(start())
        if not self.concurrent:
            self._inflight.append(pending)
        return pending


class Policy:
    def __init__(self, spec: PolicySpec, rollout_workers: list, learner=None, get=None,
                 adapter: Optional[str] = None, timeout_s: Optional[float] = None,
                 worker_nodes: Optional[list[str]] = None, train_gate: Optional[TrainGate] = None):
        self.spec = spec
        # LoRA policy on a shared engine: its requests name this adapter; syncs push only the adapter
        self.adapter = adapter
        self.name = spec.name
        self.rollout_workers = rollout_workers
        self.learner = learner
        self._get = get
        self.deadline = Deadline("generate", "rollout.timeout_s", timeout_s)
        self.worker_nodes = worker_nodes or ["?"] * len(rollout_workers)
        self.dirty = False  # trained since the rollout workers last received weights
        # weight version on the rollout workers (pushes so far); completions carry the one they came from
        self.version = 0
        self.train_gate = train_gate or TrainGate()

    @property
    def trainable(self) -> bool:
        return self.learner is not None

    # ---- rollout ----------------------------------------------------------------------------
    def generate_async(self, requests: Sequence[GenerationRequest]) -> Pending:
        """Spread requests over the rollout workers (contiguous slices keep shared prefixes together)."""
        n, k = len(requests), len(self.rollout_workers)
        bounds = [round(i * n / k) for i in range(k + 1)]
        refs, splits, names, tokens = [], [], [], []
        for j, (w, (a, b)) in enumerate(zip(self.rollout_workers, zip(bounds, bounds[1:]))):
            if b > a:
                refs.append(w.generate.remote(list(requests[a:b]), self.adapter))
                splits.append(list(range(a, b)))
                names.append(f"rollout worker {j} of policy {self.name!r} "
                             f"(actor {actor_label(w)}, node {self.worker_nodes[j]})")
                tokens.append(request_tokens(requests[a:b]))
        return Pending(refs, splits, n, self._get, names, tokens, self.deadline, workers=self.rollout_workers)

    def generate(self, requests: Sequence[GenerationRequest]) -> list[list[Completion]]:
        return self.generate_async(requests).result()

    @property
    def engine(self) -> tuple:
        """What identifies the engine this policy generates with: its rollout workers and adapter
        (frozen policies with the same base weights share workers)."""
        return tuple(id(w) for w in self.rollout_workers), self.adapter

    def tokenize(self, messages: list[dict[str, str]], completion: str) -> tuple[list[int], list[int]]:
        """(prompt ids, completion ids + EOS) of a chat prompt and its reply, templated exactly as
        this policy's rollout workers template prompts (so SFT data matches what they generate)."""
        ref = self.rollout_workers[0].tokenize.remote(messages, completion)
        return tuple(self._get(ref, timeout=self.deadline.seconds()))

    # ---- learning ---------------------------------------------------------------------------
    def _require_learner(self, what: str):
        if self.learner is None:
            raise RuntimeError(f"policy {self.name!r} is frozen (no learner); cannot {what}")
        return self.learner

    def train(self, samples: Sequence[Sample | PairSample], loss: LossConfig) -> dict[str, float]:
        """One optimiser step of `loss` over all samples (split over ranks and micro-batches)."""
        return self.train_async(samples, loss).result()

    def train_async(self, samples: Sequence[Sample | PairSample], loss: LossConfig) -> TrainPending:
        """`train` dispatched; several policies' steps may then run at the same time (the
        engine's `learner.concurrent` decides whether they do)."""
        learner = self._require_learner("train")
        pending = self.train_gate.dispatch(lambda: learner.train_step_async(list(samples), loss))
        self.dirty = True
        return pending

    def logprobs(self, samples: Sequence[Sample], reference: bool = False) -> list[list[float]]:
        """Per-token log-probs of each sample's completion under the current (or reference) model."""
        return self._require_learner("score samples").logprobs(list(samples), reference=reference)

    def snapshot_reference(self) -> None:
        """Make the current weights the frozen reference (DPO after SFT uses the SFT model)."""
        self._require_learner("snapshot a reference").snapshot_reference()

    def sync_weights(self) -> dict:
        """Push the learner's weights (a LoRA policy on a shared engine: its adapter) to every
        rollout worker of this policy; returns the push's timings and bytes ({} if nothing to do)."""
        if self.learner is None or not self.dirty:
            return {}
        names = [f"rollout worker {i} of policy {self.name!r} (actor {actor_label(w)}, node {node})"
                 for i, (w, node) in enumerate(zip(self.rollout_workers, self.worker_nodes))]
        wait_for_generations(self.rollout_workers)  # trainer.max_staleness >= 1: the next rollout may be running
        if self.adapter is not None:
            info = self.learner.push_adapter(self.rollout_workers, self.adapter, names)
        else:
            info = self.learner.push_weights(self.rollout_workers, names)
        self.dirty = False
        self.version += 1
        return info


class AllPending:
    """In-flight generations of several policies; `result()` returns key -> completions."""

    def __init__(self, parts: list[tuple[Pending, list[tuple[Hashable, int, int]]]]):
        self._parts = parts

    def result(self) -> dict[Any, list[list[Completion]]]:
        out: dict[Any, list[list[Completion]]] = {}
        for pending, slices in self._parts:
            res = pending.result()
            for key, a, b in slices:
                out[key] = res[a:b]
        return out


def generate_all(calls: Mapping[Hashable, tuple[Policy, Sequence[GenerationRequest]]]) -> AllPending:
    """Dispatch every call at once; calls to policies sharing an engine go out as one generate
    call (one batch, requests in the order of `calls`) and are split back per key."""
    by_engine: dict[tuple, tuple[Policy, list[GenerationRequest], list[tuple[Hashable, int, int]]]] = {}
    for key, (policy, requests) in calls.items():
        first, reqs, slices = by_engine.setdefault(policy.engine, (policy, [], []))
        slices.append((key, len(reqs), len(reqs) + len(requests)))
        reqs.extend(requests)
    return AllPending([(first.generate_async(reqs), slices) for first, reqs, slices in by_engine.values()])
