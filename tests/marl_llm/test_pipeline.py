"""The rollout side of the loop (marl_llm/pipeline.py) without engines: K = 0 collects inline in
step order; K >= 1 collects ahead in a thread but never more than K weight versions ahead of the
pushes; staleness bookkeeping and dropping; checkpoints resume from the first batch not trained."""
import threading
import time

import pytest

from marl_llm.checkpoint import TaskStream
from marl_llm.metrics import PhaseTimer
from marl_llm.pipeline import RolloutProducer, staleness
from marl_llm.types import Episode, Turn


class FakeAlgo:
    def __init__(self, timer, seconds=0.0):
        self.timer, self.seconds, self.calls = timer, seconds, []
        self.lock = threading.Lock()

    def collect(self, tasks, step):
        with self.timer("generate"):
            with self.lock:
                self.calls.append(("start", step, threading.current_thread().name))
            time.sleep(self.seconds)
        return [Episode(task=t, turns=[Turn("a", "policy", [1], [2], "x", version=step)], reward=1.0) for t in tasks]


def producer(k, seconds=0.0, steps=5):
    timer = PhaseTimer()
    algo = FakeAlgo(timer, seconds)
    stream = TaskStream([{"id": i} for i in range(10)], 2, seed=0)
    return algo, RolloutProducer(algo, stream, 0, steps, k, timer, timer.origin)


def test_synchronous_collects_inline_in_step_order():
    algo, p = producer(0)
    got = [p.next() for _ in range(3)]
    assert [r.step for r in got] == [0, 1, 2] and all(c[2] == "MainThread" for c in algo.calls)
    assert "time/generate" in got[0].phases and got[0].spans["span/collect/end"] >= got[0].spans["span/collect/start"]
    p.close()


@pytest.mark.parametrize("k", [1, 2])
def test_ahead_by_at_most_k_pushes(k):
    algo, p = producer(k, seconds=0.02, steps=6)
    time.sleep(0.5)  # the producer runs as far as it may without any push
    assert [c[1] for c in algo.calls] == list(range(k + 1))  # steps 0..K: their weights are there
    assert all(c[2] == "rollout-producer" for c in algo.calls)
    for step in range(6):
        r = p.next()
        assert r.step == step
        p.synced_through(step)  # step's weights pushed: step + K + 1 may start
        time.sleep(0.15)
        assert max(c[1] for c in algo.calls) == min(5, step + k + 1)
    p.close()


def test_a_failing_collect_is_raised_in_the_trainer():
    algo, p = producer(1)
    algo.collect = lambda tasks, step: (_ for _ in ()).throw(RuntimeError("engine died"))
    p2 = RolloutProducer(algo, TaskStream([{"id": 0}], 1, 0), 0, 3, 1, PhaseTimer(), 0.0)
    with pytest.raises(RuntimeError, match="engine died"):
        p2.next()
    p.close()
    p2.close()


def test_a_checkpoint_resumes_from_the_first_batch_not_trained():
    algo, p = producer(2, steps=5)
    time.sleep(0.3)  # batches 0..2 drawn ahead
    first = p.next()
    fresh = TaskStream([{"id": i} for i in range(10)], 2, seed=0)
    fresh.next_batch()  # what a synchronous run has drawn after step 0
    assert p.data_state(1) == fresh.state_dict()  # not the stream's position (3 batches drawn)
    assert p.stream.state_dict() != fresh.state_dict() and first.step == 0
    p.close()


def _ep(policy_versions):
    return Episode(task={"id": 0}, turns=[Turn(a, a, [1], [2], "x", version=v) for a, v in policy_versions])


def test_staleness_counts_lags_per_trainable_policy_and_drops_old_episodes():
    eps = [_ep([("a", 3), ("b", 1)]), _ep([("a", 2), ("b", 1)]), _ep([("a", 1), ("team", 0)])]
    kept, m = staleness(eps, {"a": 3, "b": 1}, max_staleness=1)
    assert kept == eps[:2]  # a at version 1 is 2 behind
    assert m == {"staleness/dropped": 1.0, "staleness/a/max": 1.0, "staleness/a/mean": 0.5,
                 "staleness/b/max": 0.0, "staleness/b/mean": 0.0}
    kept, m = staleness(eps, {"a": 3, "b": 1}, max_staleness=2)
    assert kept == eps and m["staleness/a/max"] == 2.0 and m["staleness/dropped"] == 0.0


def test_phase_timer_is_per_thread_and_gives_spans():
    timer = PhaseTimer()
    with timer("train"):
        t = threading.Thread(target=lambda: timer("generate").__enter__())  # another thread's phase
        t.start()
        t.join()
        time.sleep(0.01)
    out = timer.pop()
    assert set(out) == {"time/train", "span/train/start", "span/train/end"}
    assert out["span/train/end"] - out["span/train/start"] >= 0.01 - 1e-3


def test_loss_corrects_off_policy_samples_only_when_the_loop_overlaps():
    from algorithms.base import Algorithm, PGConfig
    from marl_llm.config import RolloutConfig, RunConfig, TrainerConfig
    for k, want in [(0, "none"), (1, "tis")]:
        run = RunConfig(algo=PGConfig(), rollout=RolloutConfig(temperature=0.7), trainer=TrainerConfig(max_staleness=k))
        loss = Algorithm(run.algo, None, run).loss
        assert loss.off_policy == want and loss.behavior_temperature == 0.7
