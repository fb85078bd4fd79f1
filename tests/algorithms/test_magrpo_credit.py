"""MAGRPO credit assignment on hand-built joint actions (no engines)."""
import pytest

from algorithms.magrpo import MAGRPO, MAGRPOConfig
from envs.base import make_env
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import ConfigError, RunConfig, load_model_preset
from marl_llm.types import Episode, Turn


def _turn(agent, i):
    return Turn(agent=agent, policy=agent, prompt_ids=[1], completion_ids=[10 + i], text=str(i), id=f"{agent}{i}")


def _algo(**kw):
    cfg = MAGRPOConfig(**kw)
    env = make_env({"name": "toy"})
    return MAGRPO(cfg, env, RunConfig(algo=cfg, env=env.cfg, model=load_model_preset("tiny")))


def test_aligned_advantage_is_shared_by_all_agents():
    algo = _algo(group_size=2)
    eps = [Episode(task={"id": 0}, turns=[_turn("agent1", g), _turn("agent2", g)], reward=r, group="0/t0",
                   meta={"turn": 0}) for g, r in enumerate([3.0, 1.0])]
    s = algo.credit(eps)
    assert [x.advantage for x in s["agent1"]] == [1.0, -1.0]
    assert [x.advantage for x in s["agent2"]] == [1.0, -1.0]
    assert all(x.weight == 1.2 for x in s["agent1"])


def test_cross_uses_marginal_advantage_and_turn_weight():
    algo = _algo(group_size=2, joint="cross")
    rewards = {(0, 0): 4.0, (0, 1): 2.0, (1, 0): 0.0, (1, 1): 2.0}  # mean 2
    eps = [Episode(task={"id": 0}, turns=[_turn("agent1", a), _turn("agent2", b)], reward=r, group="0/t1",
                   meta={"turn": 1}) for (a, b), r in rewards.items()]
    s = algo.credit(eps)
    assert [x.advantage for x in s["agent1"]] == [1.0, -1.0]   # (2+0)/2, (-2+0)/2
    assert [x.advantage for x in s["agent2"]] == [0.0, 0.0]    # (2-2)/2, (0+0)/2
    assert all(x.weight == 0.8 for x in s["agent2"])


class _Pending:
    def __init__(self, log, name, loss):
        self.log, self.name, self.loss = log, name, loss

    def result(self):
        self.log.append(("result", self.name))
        return {"loss": self.loss}


class _Trainable:
    """Records when each agent's train step is dispatched and when it is awaited."""

    def __init__(self, name, log, loss):
        self.name, self.log, self.loss = name, log, loss

    def train_async(self, samples, loss):
        self.log.append(("dispatch", self.name, len(samples)))
        return _Pending(self.log, self.name, self.loss)


def test_update_dispatches_every_agents_step_before_awaiting_any():
    algo, log = _algo(group_size=2), []
    algo.setup({"agent1": _Trainable("agent1", log, 1.0), "agent2": _Trainable("agent2", log, 3.0)},
               TrajectoryBuffer())
    eps = [Episode(task={"id": 0}, turns=[_turn("agent1", g), _turn("agent2", g)], reward=r, group="0/t0",
                   meta={"turn": 0}) for g, r in enumerate([3.0, 1.0])]
    metrics = algo.update(eps, step=1)
    assert log == [("dispatch", "agent1", 2), ("dispatch", "agent2", 2), ("result", "agent1"), ("result", "agent2")]
    assert metrics["agent1/loss"] == 1.0 and metrics["agent2/loss"] == 3.0 and metrics["loss"] == 2.0


def test_advantage_clamped():
    algo = _algo(group_size=2, adv_clamp=10.0)
    eps = [Episode(task={"id": 0}, turns=[_turn("agent1", g), _turn("agent2", g)], reward=r, group="g",
                   meta={"turn": 0}) for g, r in enumerate([50.0, 0.0])]
    assert [x.advantage for x in algo.credit(eps)["agent1"]] == [10.0, -10.0]


@pytest.mark.parametrize("kw, needle", [
    (dict(joint="both"), "algo.joint='both'"),
    (dict(agents=["a", "a"]), "distinct"),
    (dict(turns=3), "turn_weights"),
    (dict(feedback="policy:zed"), "policy:<agent>"),
    (dict(group_size=1), "algo.group_size=1 must be >= 2; group-relative advantages"),
    (dict(loss_agg="mean"), "algo.loss_agg='mean' is not allowed; choose one of ['token_sum'"),
    (dict(clip_eps=0.0), "algo.clip_eps=0.0 must be > 0 or null"),
    (dict(adv_clamp=0.0), "algo.adv_clamp=0.0 must be > 0"),
])
def test_bad_config(kw, needle):
    with pytest.raises(ConfigError, match=None) as e:
        MAGRPOConfig(**kw)
    assert needle in str(e.value)


def test_role_models_name_agents():
    with pytest.raises(ConfigError, match=r"algo.role_models=.*keys must be roles of \['agent1', 'agent2'\]"):
        _algo(role_models={"zed": "tiny"}).validate()
    algo = _algo(role_models={"agent2": "tiny-wide"})
    algo.validate()
    assert [s.model.name for s in algo.policy_specs()] == ["tiny", "tiny-wide", "tiny", "tiny-wide"]
