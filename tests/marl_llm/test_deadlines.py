"""The deadline arithmetic (marl_llm/deadlines.py) and how a generate call uses it (no engine)."""
import time

import pytest

from marl_llm import deadlines
from marl_llm.deadlines import BASE_S, FLOOR_TOKENS_PER_S, MARGIN, Deadline, collective_seconds
from marl_llm.policy import ActorHung, Pending, request_tokens
from marl_llm.types import Completion, GenerationRequest, SamplingConfig


def test_a_set_deadline_is_used_as_is():
    d = Deadline("generate", "rollout.timeout_s", 20.0)
    assert d.seconds(10_000) == 20.0
    assert "20s (rollout.timeout_s, set)" in d.describe(20.0)


def test_a_sized_deadline_follows_the_tokens_and_the_slowest_rate_seen():
    d = Deadline("generate", "rollout.timeout_s", None)
    assert d.seconds(0) == BASE_S
    assert d.seconds(1000) == BASE_S + MARGIN * 1000 / FLOOR_TOKENS_PER_S  # before any call: the floor
    d.observe(1000, 10.0)   # 100 tokens/s
    d.observe(1000, 5.0)    # 200 tokens/s: faster, the floor stays at the slowest
    assert d.seconds(1000) == pytest.approx(BASE_S + MARGIN * 1000 / 100)
    d.observe(0, 3.0)       # a call that produced nothing says nothing about the rate
    assert d.seconds(1000) == pytest.approx(BASE_S + MARGIN * 1000 / 100)
    assert "sized from the work" in d.describe(123)


def test_collectives():
    assert collective_seconds(None) == deadlines.COLLECTIVE_S and collective_seconds(15) == 15.0


def test_request_tokens_is_the_worst_case():
    reqs = [GenerationRequest(prompt_ids=[1], sampling=SamplingConfig(n=4, max_tokens=64)),
            GenerationRequest(prompt_ids=[1], sampling=SamplingConfig(n=2, max_tokens=10))]
    assert request_tokens(reqs) == 4 * 64 + 2 * 10


class GetTimeoutError(Exception):
    """Ray's exception of the same name (matched by name, as from ray.exceptions)."""


def test_a_generate_call_past_its_deadline_names_the_worker_and_the_deadline():
    def never(ref, timeout=None):
        assert timeout is not None and timeout <= 1.0
        raise GetTimeoutError()

    p = Pending(["ref"], [[0]], 1, never, ["rollout worker 0 of policy 'p' (actor ab, node 10.0.0.2/ff)"], [10],
                Deadline("generate", "rollout.timeout_s", 1.0))
    with pytest.raises(ActorHung, match=r"rollout worker 0 of policy 'p' \(actor ab, node 10.0.0.2/ff\) hung in "
                                        r"generate: its deadline of 1s \(rollout.timeout_s, set\) passed"):
        p.result()


def test_a_finished_call_teaches_the_deadline_its_rate():
    comp = Completion(prompt_ids=[1], completion_ids=[5] * 50, logprobs=[-1.0] * 50, text="x")
    d = Deadline("generate", "rollout.timeout_s", None)
    p = Pending(["ref"], [[0]], 1, lambda ref, timeout=None: [[comp]], tokens=[64], deadline=d)
    time.sleep(0.01)
    assert p.result() == [[comp]]
    assert d.slowest is not None and d.slowest > 0


# ---- a weight push waits for the generate calls in flight on its workers --------------------------
class _Remote:
    def __init__(self, fn):
        self.remote = fn


class _Worker:
    def __init__(self):
        self.generate = _Remote(lambda requests, adapter: f"ref{id(self)}")


def _slow_get(release, fetched):
    def get(ref, timeout=None):
        assert release.wait(timeout=5), "the call was never released"
        fetched.append(ref)
        return [[Completion(prompt_ids=[1], completion_ids=[2], logprobs=[-1.0], text="x")]]
    return get


def _policy(workers, get, learner=None):
    from marl_llm.policy import Policy, PolicySpec
    return Policy(PolicySpec("p", model=None), workers, learner=learner, get=get)


def test_a_push_waits_for_the_generation_in_flight_then_runs_on_its_own_deadline():
    import threading

    release, fetched, order = threading.Event(), [], []

    class Learner:
        def push_weights(self, workers, names):
            order.append(("push", len(fetched)))
            return {}

    worker = _Worker()
    policy = _policy([worker], _slow_get(release, fetched), Learner())
    pending = policy.generate_async([GenerationRequest(prompt_ids=[1])])  # the next rollout, in flight
    policy.dirty = True
    pusher = threading.Thread(target=policy.sync_weights)
    pusher.start()
    time.sleep(0.2)
    assert order == []  # the push has not started while the generation runs
    release.set()
    pusher.join(timeout=5)
    assert order == [("push", 1)] and policy.version == 1
    assert pending.result()[0][0].text == "x" and len(fetched) == 1  # fetched once, by the push's wait


def test_a_push_does_not_wait_for_other_workers_and_a_hung_call_names_its_worker():
    from marl_llm.policy import wait_for_generations

    release, fetched = __import__("threading").Event(), []
    busy, idle = _Worker(), _Worker()
    pending = _policy([busy], _slow_get(release, fetched)).generate_async([GenerationRequest(prompt_ids=[1])])
    t0 = time.monotonic()
    wait_for_generations([idle])
    assert time.monotonic() - t0 < 0.5 and fetched == []

    def never(ref, timeout=None):
        raise GetTimeoutError()

    stuck = _Worker()
    hung = _policy([stuck], never)
    hung.deadline = Deadline("generate", "rollout.timeout_s", 0.1)
    held = hung.generate_async([GenerationRequest(prompt_ids=[1])])  # noqa: F841 (its caller holds it)
    with pytest.raises(ActorHung, match=r"rollout worker 0 of policy 'p' .* hung in generate"):
        wait_for_generations([stuck])
    release.set()
    assert pending.result()[0][0].text == "x"
