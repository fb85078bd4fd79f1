"""The rollout side of the training loop: synchronous, or overlapped with training under a
staleness bound (`trainer.max_staleness=K`).

K = 0 is the synchronous loop: step s collects, then trains, then pushes its weights, the same
calls in the same order as a loop without this module. With K >= 1 a background thread collects
the rollout of the next steps while the learners train the current one: the rollout of step s
starts once the weights of step s-K-1's update have reached the rollout workers, so when step s
trains, its samples are at most K weight versions old (the way verl's one-step-off-policy and
AReaL's bounded-staleness pipelines bound it; AReaL, arXiv 2505.24298, section 4).

Weight versions: every rollout worker counts the weights it has loaded (per LoRA adapter on a
shared engine) and stamps each completion with that count (`Completion.version` -> `Turn.version`);
the driver counts the pushes of each policy (`Policy.version`). A turn's lag when it is trained
is `policy.version - turn.version`. Episodes with a turn of a trainable policy more than K
versions behind are dropped (counted; the bound above makes that a safeguard, not a routine).

The algorithm stays engine-free: the overlap is two threads calling the same `collect` and
`update` an algorithm already has; the engine's actors (rollout workers, learner ranks) are
separate processes, so generation and training really run at the same time.
"""
from __future__ import annotations

import logging
import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from marl_llm.checkpoint import TaskStream
from marl_llm.metrics import PhaseTimer
from marl_llm.types import Episode

log = logging.getLogger(__name__)


@dataclass
class Rollout:
    """One step's collected episodes, with when and from where in the task stream."""

    step: int
    episodes: list[Episode]
    data_state: dict[str, int]  # the task stream's position before this step's batch was drawn
    phases: dict[str, float] = field(default_factory=dict)  # the collect's phase times (time/<phase>)
    spans: dict[str, float] = field(default_factory=dict)   # span/collect/start|end (s since the run began)


class RolloutProducer:
    """Yields each step's `Rollout`: collected inline (K = 0) or ahead in a thread (K >= 1)."""

    def __init__(self, algo, stream: TaskStream, first_step: int, last_step: int, max_staleness: int,
                 timer: PhaseTimer, started: float):
        self.algo, self.stream, self.k, self.timer, self.started = algo, stream, max_staleness, timer, started
        self.next_step, self.last_step = first_step, last_step
        self.synced = first_step  # steps whose updated weights reached the rollout workers
        self._cond = threading.Condition()
        self._drawn: dict[int, dict[str, int]] = {}  # step -> stream position before its batch
        self._stop = False
        self._queue: "queue.Queue[Rollout | BaseException]" = queue.Queue()
        self._thread: Optional[threading.Thread] = None
        if self.k > 0:
            self._thread = threading.Thread(target=self._run, name="rollout-producer", daemon=True)
            self._thread.start()

    # ---- the producer ------------------------------------------------------------------------
    def _collect(self, step: int) -> Rollout:
        with self._cond:  # the draw and its record are one event for `data_state`
            self._drawn[step] = self.stream.state_dict()
            batch = self.stream.next_batch()
        t0 = time.perf_counter()
        episodes = self.algo.collect(batch, step)
        t1 = time.perf_counter()
        return Rollout(step, episodes, self._drawn[step], self.timer.pop(),
                       {"span/collect/start": round(t0 - self.started, 3), "span/collect/end": round(t1 - self.started, 3)})

    def _run(self) -> None:
        try:
            for step in range(self.next_step, self.last_step):
                with self._cond:
                    while self.synced < step - self.k and not self._stop:
                        self._cond.wait()
                    if self._stop:
                        return
                self._queue.put(self._collect(step))
        except BaseException as e:  # noqa: BLE001 — handed to the trainer, which raises it
            self._queue.put(e)

    # ---- the trainer's side ------------------------------------------------------------------
    def next(self) -> Rollout:
        """The next step's rollout (blocks while it is being collected); a failure in the
        producer is raised here, in the trainer's thread."""
        step, self.next_step = self.next_step, self.next_step + 1
        if self._thread is None:
            return self._collect(step)
        item = self._queue.get()
        if isinstance(item, BaseException):
            raise item
        assert item.step == step, (item.step, step)
        return item

    def synced_through(self, step: int) -> None:
        """Step `step`'s weights reached the rollout workers: rollouts up to step + K + 1 may start."""
        with self._cond:
            self.synced = step + 1
            self._cond.notify_all()

    def data_state(self, next_step: int) -> dict[str, int]:
        """The task stream's position before `next_step`'s batch (what a checkpoint after step
        next_step - 1 resumes from): batches drawn ahead are drawn again after a resume."""
        with self._cond:
            return dict(self._drawn.get(next_step, self.stream.state_dict()))

    def close(self) -> None:
        """Stop producing (a collect in flight finishes its current call or fails with its actor)."""
        with self._cond:
            self._stop = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=5.0)


# ---- staleness -----------------------------------------------------------------------------------
def staleness(episodes: list[Episode], versions: dict[str, int], max_staleness: int
              ) -> tuple[list[Episode], dict[str, float]]:
    """Keep the episodes whose turns of trainable policies (`versions`: policy -> the version
    its learner is at) are at most `max_staleness` versions old; returns (kept, metrics):
    `staleness/<policy>/max|mean` over the kept turns and `staleness/dropped` (episodes)."""
    def lag(t) -> int:
        return versions[t.policy] - t.version

    kept = [e for e in episodes if all(lag(t) <= max_staleness for t in e.turns if t.policy in versions)]
    metrics: dict[str, Any] = {"staleness/dropped": float(len(episodes) - len(kept))}
    for name in versions:
        lags = [lag(t) for e in kept for t in {id(t): t for t in e.turns}.values() if t.policy == name]
        if lags:
            metrics[f"staleness/{name}/max"] = float(max(lags))
            metrics[f"staleness/{name}/mean"] = sum(lags) / len(lags)
    if len(kept) < len(episodes):
        log.warning("dropped %d of %d episodes older than trainer.max_staleness=%d weight versions",
                    len(episodes) - len(kept), len(episodes), max_staleness)
    return kept, metrics
