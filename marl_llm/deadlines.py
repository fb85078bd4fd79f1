"""Deadlines on remote calls: a hung actor (stopped, stuck in a collective, a lost node) becomes an
error within a bounded time instead of stalling the run forever.

Every remote call the driver waits on has one: a generate call (`rollout.timeout_s`), a train
step, a scoring call, each part of a weight push and a checkpoint save (`learner.timeout_s`, which
is also the collectives' timeout inside the learner group and the weight-sync group; a push first
waits for the generate calls in flight on its rollout workers, each within its own deadline, since
a worker loads weights only between calls: `policy.wait_for_generations`). A number
pins a deadline. `null` (the default) sizes it from the work so a healthy slow machine never
trips it:

    deadline = BASE_S + MARGIN x tokens / rate

where `tokens` is the call's worst case (every request's `n x max_tokens` for a generate call, the
tokens through the model for a train step) and `rate` the slowest tokens/s this phase has shown
in this run, or FLOOR_TOKENS_PER_S before it has run once. Calls without a token count (a push,
a save) get BASE_S. On this project's 2-core CPU machines SmolLM2-135M generates at 100-220
tokens/s and trains at ~120 tokens/s, so FLOOR_TOKENS_PER_S = 20 is 5x below the slowest healthy
rate before the margin. With several learner ranks the driver waits COLLECTIVE_GRACE_S longer
than the ranks' collective timeout: the rank left waiting for a stopped peer reports first, so
the peer that stopped answering is the one named (marl_llm/learner/group.py).
"""
from __future__ import annotations

from typing import Optional

BASE_S = 300.0            # start-up work inside a call (a first compile, a cold cache) and slack
MARGIN = 5.0              # times the slowest rate seen
FLOOR_TOKENS_PER_S = 20.0  # the rate assumed before a phase has run once
COLLECTIVE_S = 600.0      # collectives and pushes without learner.timeout_s
SAVE_S = 3600.0           # a checkpoint save or load without learner.timeout_s (tens of GB on GPUs)
COLLECTIVE_GRACE_S = 30.0  # the driver outwaits the ranks' collective timeout by this much
START_S = 900.0           # an actor's start-up: a model load, a first compile (cold caches)


class Deadline:
    """The deadline of one kind of call (`phase`), learning the slowest healthy rate as it goes."""

    def __init__(self, phase: str, key: str, fixed: Optional[float]):
        self.phase, self.key, self.fixed = phase, key, fixed
        self.slowest: Optional[float] = None  # tokens/s

    def seconds(self, tokens: float = 0.0) -> float:
        if self.fixed is not None:
            return float(self.fixed)
        rate = self.slowest if self.slowest is not None else FLOOR_TOKENS_PER_S
        return BASE_S + MARGIN * tokens / max(rate, 1e-9)

    def observe(self, tokens: float, elapsed_s: float) -> None:
        """A call that finished: its rate lowers the floor if it is the slowest yet."""
        if tokens > 0 and elapsed_s > 0:
            rate = tokens / elapsed_s
            self.slowest = rate if self.slowest is None else min(self.slowest, rate)

    def describe(self, seconds: float) -> str:
        how = "set" if self.fixed is not None else "sized from the work"
        return f"its deadline of {seconds:.0f}s ({self.key}, {how}) passed"


def collective_seconds(fixed: Optional[float]) -> float:
    """The timeout of a collective (gloo/NCCL) and of a push: `learner.timeout_s` or COLLECTIVE_S."""
    return float(fixed) if fixed is not None else COLLECTIVE_S
