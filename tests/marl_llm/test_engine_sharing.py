"""Which policies share an engine (cluster.engine_key, Cluster.build_policies), without engines:
frozen policies share only when their weights are equal, also when one loads a checkpoint."""
import dataclasses

from marl_llm.api import compose
from marl_llm.cluster import Cluster, engine_key
from marl_llm.config import load_model_preset
from marl_llm.policy import PolicySpec


def _run():
    return compose("algo=grpo", "env=toy", "model=tiny", "rollout.backend=vllm")


def test_frozen_policies_share_only_equal_weights():
    run, tiny = _run(), load_model_preset("tiny")
    trained, base = PolicySpec("policy", tiny, trainable=False), PolicySpec("base", tiny, trainable=False)
    assert engine_key(trained, run.rollout) == engine_key(base, run.rollout)  # both the initial weights
    assert engine_key(trained, run.rollout, "/ckpt/step_4/policy") != engine_key(base, run.rollout)
    assert engine_key(trained, run.rollout, "/a") != engine_key(base, run.rollout, "/b")
    assert engine_key(PolicySpec("p", tiny), run.rollout) != engine_key(PolicySpec("q", tiny), run.rollout)


def test_evaluating_a_checkpoint_next_to_the_initial_model_starts_two_engines(monkeypatch):
    """python -m marl_llm.evaluate: every policy frozen, the trained one loads the checkpoint;
    the untrained baseline must not be served by the checkpoint's engine."""
    run, tiny = _run(), load_model_preset("tiny")
    specs = [PolicySpec("policy", tiny, trainable=False), PolicySpec("base", tiny, trainable=False),
             PolicySpec("base2", dataclasses.replace(tiny), trainable=False)]
    inits = {"policy": "/ckpt/step_4/policy", "base": None, "base2": None}
    started = []
    cluster = Cluster(run.cluster)
    monkeypatch.setattr(cluster, "_rollout_workers", lambda spec, run, init, lora=None, name=None:
                        started.append((name, init)) or [object()])
    monkeypatch.setattr(cluster, "_ready", lambda workers, policy: [{}])
    policies = cluster.build_policies(specs, run, inits)
    assert started == [("policy", "/ckpt/step_4/policy"), ("base+base2", None)]
    assert policies["base"].rollout_workers is policies["base2"].rollout_workers
    assert policies["policy"].rollout_workers is not policies["base"].rollout_workers
    one = run.rollout.num_cpus * run.rollout.num_workers
    assert cluster.cpus_needed(specs, run, inits) == 2 * one and cluster.cpus_needed(specs, run) == one


def test_every_engine_and_learner_group_starts_before_any_is_waited_for(monkeypatch):
    """Start-up overlaps: a run's setup takes as long as its slowest engine, not the sum of all."""
    import marl_llm.learner.group as group

    run, tiny = _run(), load_model_preset("tiny")
    specs = [PolicySpec("a", tiny), PolicySpec("b", tiny), PolicySpec("frozen", tiny, trainable=False)]
    events = []

    class FakeLearnerGroup:
        def __init__(self, name, *args, wait=True, **kwargs):
            assert wait is False  # launched only; waited for below
            self.name = name
            events.append(("launch learner", name))

        def wait_ready(self):
            events.append(("wait learner", self.name))
            return self

    cluster = Cluster(run.cluster)
    monkeypatch.setattr(group, "LearnerGroup", FakeLearnerGroup)
    monkeypatch.setattr(cluster, "_rollout_workers", lambda spec, run, init, lora=None, name=None:
                        events.append(("launch engine", name)) or [object()])
    monkeypatch.setattr(cluster, "_ready", lambda workers, policy: events.append(("wait engine", policy)) or [{}])
    policies = cluster.build_policies(specs, run)
    kinds = [kind for kind, _ in events]
    assert kinds == ["launch engine"] * 3 + ["launch learner"] * 2 + ["wait learner"] * 2 + ["wait engine"] * 3
    assert policies["a"].learner.name == "a" and policies["frozen"].learner is None
