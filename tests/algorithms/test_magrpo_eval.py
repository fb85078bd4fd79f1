"""MAGRPO evaluation: the trained pair and the four baselines, driven with fake policies on the
writing env (prompts and rewards are the env's own; only generation is faked)."""
from __future__ import annotations

from pathlib import Path

import pytest
from helpers import FakePolicy as SharedFakePolicy

from algorithms.magrpo import MAGRPO, MAGRPOConfig
from envs.base import make_env
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ClusterConfig, ConfigError, LearnerConfig, RolloutConfig, RunConfig, TrainerConfig,
                             load_model_preset)

ROOT = Path(__file__).resolve().parents[2]
POSTS = str(ROOT / "examples" / "data" / "tldr_posts.jsonl")

# what each policy writes, by what its prompt asks for (so the test sees which prompt arrived)
BASE_TEXT = {
    "agent1": "She eats my food and laughs it off.",
    "agent2": "My roommate has been eating my groceries for two months and I am on a tight budget.",
    "sequential": ("Moreover, my roommate has been eating the groceries I buy for two months, "
                   "and she laughs it off; however I am on a tight budget and want to keep the friendship."),
    "discussion": ("In addition, for two months my roommate ate the food I bought; therefore I must choose "
                   "between labels and a mini fridge, because my budget is tight."),
    "single": "<part1>Roommate eats my food.</part1><part2>She laughs, and I am on a budget.</part2>",
}
TRAINED_TEXT = {
    "agent1": "My roommate keeps eating my groceries.",
    "agent2": ("Furthermore, she has eaten my groceries for two months and laughs about it, so I wonder "
               "whether to label my food or buy a mini fridge, since I spend forty dollars a week."),
}


def reply_by_prompt(p, r, j):
    """What each policy writes, chosen by what its prompt asks for; evaluation must be greedy."""
    assert r.sampling.temperature == 0.0 and r.sampling.n == 1  # evaluation is greedy
    user = r.messages[-1]["content"]
    if "Your teammates answered" in user:
        key = "discussion"
    elif "Your partner's concise summary" in user:
        key = "sequential"
    elif "Write two summaries" in user:
        key = "single"
    elif "concise summary of this post" in user:
        key = "agent1"
    else:
        key = "agent2"
    return p.texts.get(key, p.texts.get("agent2"))


def FakePolicy(name, texts):
    """The shared fake (tests/helpers.py) with this file's texts; completions are one [7] per word."""
    pol = SharedFakePolicy(name, reply_by_prompt, completion_ids=lambda text: [7] * len(text.split()))
    pol.texts = texts
    return pol


def make_algo(env=None, **kw):
    env = env or make_env({"name": "writing", "data": {"path": POSTS, "eval_size": 4}})
    cfg = MAGRPOConfig(**kw)
    run = RunConfig(algo=cfg, env=env.cfg, model=load_model_preset("tiny"), rollout=RolloutConfig(),
                    learner=LearnerConfig(), cluster=ClusterConfig(), trainer=TrainerConfig(), seed=0)
    return MAGRPO(cfg, env, run), env


def evaluated(n_tasks=3):
    """The default pair evaluated on `n_tasks` writing tasks: trained agents, and one fake for
    base-agent1 and base-agent2 (the same weights: one engine). Returns (algo, env, tasks, out,
    trained fakes, base fake)."""
    algo, env = make_algo()
    trained = {a: FakePolicy(a, TRAINED_TEXT) for a in ("agent1", "agent2")}
    base = FakePolicy("base", BASE_TEXT)
    algo.setup({**trained, "base-agent1": base, "base-agent2": base}, TrajectoryBuffer())
    tasks = env.tasks("test")[:n_tasks]
    return algo, env, tasks, algo.evaluate(tasks), trained, base


def test_policy_specs_add_one_frozen_base_per_agent_with_its_model():
    # the engine, not the algorithm, runs frozen policies with the same base weights on one engine
    algo, _ = make_algo()
    specs = {s.name: s.trainable for s in algo.policy_specs()}
    assert specs == {"agent1": True, "agent2": True, "base-agent1": False, "base-agent2": False}
    algo, _ = make_algo(role_models={"agent1": "tiny", "agent2": "tiny-wide"})
    assert {s.name: s.model.name for s in algo.policy_specs() if not s.trainable} == {
        "base-agent1": "tiny", "base-agent2": "tiny-wide"}
    algo, _ = make_algo(eval_baselines=[])
    assert [s.name for s in algo.policy_specs()] == ["agent1", "agent2"]


def test_bad_baseline_names_are_rejected():
    with pytest.raises(ConfigError, match=r"unknown entries \['solo'\].*'naive'"):
        MAGRPOConfig(eval_baselines=["single", "solo"])
    toy = make_env({"name": "toy"})
    toy.roles = ("agent1", "agent2")
    algo, _ = make_algo(env=toy)
    with pytest.raises(ConfigError, match="no 'single' role"):
        algo.validate()
    make_algo(env=toy, eval_baselines=["naive"])[0].validate()


def test_evaluate_scores_trained_and_every_baseline_with_the_right_outputs():
    algo, env, tasks, out, trained, base = evaluated()

    def expected(outputs):
        return sum(env.reward(t, outputs).total for t in tasks) / len(tasks)

    assert out["reward"] == pytest.approx(expected(TRAINED_TEXT))
    assert out["single/reward"] == pytest.approx(expected({"single": BASE_TEXT["single"]}))
    assert out["naive/reward"] == pytest.approx(expected({"agent1": BASE_TEXT["agent1"], "agent2": BASE_TEXT["agent2"]}))
    assert out["sequential/reward"] == pytest.approx(
        expected({"agent1": BASE_TEXT["agent1"], "agent2": BASE_TEXT["sequential"]}))
    assert out["discussion/reward"] == pytest.approx(
        expected({"agent1": BASE_TEXT["discussion"], "agent2": BASE_TEXT["discussion"]}))
    # the methods differ, so a mix-up of outputs would show above
    assert len({round(out[k], 6) for k in ("reward", "naive/reward", "sequential/reward", "discussion/reward")}) == 4
    for prefix, gens in (("", 2), ("single/", 1), ("naive/", 2), ("sequential/", 2), ("discussion/", 4)):
        for k in ("structure", "coherence", "consistency", "grounding", "solved", "tokens", "latency_s", "tokens_per_s"):
            assert prefix + k in out, prefix + k
        assert out[prefix + "gens"] == gens
        assert out[prefix + "latency_s"] > 0 and out[prefix + "tokens_per_s"] > 0
    words = lambda *ks: sum(len(BASE_TEXT[k].split()) for k in ks)  # noqa: E731 - fake tokens = words
    assert out["discussion/tokens"] == words("agent1", "agent2", "discussion", "discussion")
    assert "pass" not in out  # writing has no unit tests

    # baselines use frozen weights: computed once per task set, reused; the trained pair re-runs
    calls = len(base.calls)
    assert calls == 1 + 2 + 2 + 4  # one request batch per role and stage: single, naive, sequential, discussion
    again = algo.evaluate(tasks)
    assert len(base.calls) == calls and len(trained["agent1"].calls) == 2
    assert again["naive/reward"] == out["naive/reward"]
    algo.evaluate(tasks[:2])
    assert len(base.calls) == 2 * calls


def test_coding_reports_pass_rate_on_unit_tests():
    env = make_env({"name": "coding", "data": {"limit": 2}})
    algo, _ = make_algo(env=env, eval_baselines=["single"])
    task = env.tasks("test")[0]
    ref = env.reference_outputs(task)["single"]
    both = {"single": ref, "agent1": "```python\ndef aux(x):\n    return x\n```", "agent2": ref}
    algo.setup({"agent1": FakePolicy("agent1", both), "agent2": FakePolicy("agent2", both),
                "base-agent1": FakePolicy("base-agent1", both), "base-agent2": FakePolicy("base-agent2", both)},
               TrajectoryBuffer())
    out = algo.evaluate([task])
    assert out["single/pass"] == 1.0 and out["single/reward"] == 1.0 and out["single/solved"] == 1.0
    assert out["pass"] == 1.0 and out["tests"] == 1.0


def test_evaluate_reports_intervals_and_paired_differences_against_each_baseline():
    algo, env, tasks, out, trained, base = evaluated()
    for prefix in ("", "single/", "naive/", "sequential/", "discussion/"):
        assert out[f"{prefix}reward/n"] == 3 and out[f"{prefix}solved/n"] == 3
        assert out[f"{prefix}reward/ci_low"] <= out[f"{prefix}reward"] <= out[f"{prefix}reward/ci_high"]
        assert f"{prefix}latency_s/n" not in out  # costs carry no interval
    for name in ("single", "naive", "sequential", "discussion"):
        key = f"diff/reward-{name}/reward"
        assert out[key] == pytest.approx(out["reward"] - out[f"{name}/reward"]) and out[f"{key}/n"] == 3
    assert len(algo.eval_outcomes["naive/reward"]) == 3
