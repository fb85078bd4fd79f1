"""MAGRPO credit assignment on hand-built joint actions (no engines)."""
import pytest

from algorithms.magrpo import MAGRPO, MAGRPOConfig
from envs.base import make_env
from marl_llm.config import ConfigError, RunConfig
from marl_llm.types import Episode, Turn


def _turn(agent, i):
    return Turn(agent=agent, policy=agent, prompt_ids=[1], completion_ids=[10 + i], text=str(i), id=f"{agent}{i}")


def _algo(**kw):
    cfg = MAGRPOConfig(**kw)
    return MAGRPO(cfg, make_env({"name": "toy"}), RunConfig(algo=cfg))


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


def test_advantage_clamped():
    algo = _algo(group_size=2, adv_clamp=10.0)
    eps = [Episode(task={"id": 0}, turns=[_turn("agent1", g), _turn("agent2", g)], reward=r, group="g",
                   meta={"turn": 0}) for g, r in enumerate([50.0, 0.0])]
    assert [x.advantage for x in algo.credit(eps)["agent1"]] == [10.0, -10.0]


@pytest.mark.parametrize("kw, needle", [
    (dict(joint="both"), "algo.joint='both'"),
    (dict(agents=["a", "a"]), "distinct"),
    (dict(agent_models=["tiny"]), "one preset per agent"),
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
