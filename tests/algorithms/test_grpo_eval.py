"""GRPO evaluation: the policy next to the untrained base model, with intervals and the paired
difference, driven with fake policies on env=math (prompts and rewards are the env's own)."""
from __future__ import annotations

import pytest
from helpers import FakePolicy

from algorithms.grpo import GRPO, GRPOConfig
from envs.base import make_env
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ClusterConfig, ConfigError, LearnerConfig, RolloutConfig, RunConfig, TrainerConfig,
                             load_model_preset)


def make_algo(**kw):
    env = make_env({"name": "math", "train_size": 4, "eval_size": 6})
    cfg = GRPOConfig(**kw)
    run = RunConfig(algo=cfg, env=env.cfg, model=load_model_preset("tiny"), rollout=RolloutConfig(),
                    learner=LearnerConfig(), cluster=ClusterConfig(), trainer=TrainerConfig(), seed=0)
    return GRPO(cfg, env, run), env


def answer(gold_of_task):
    def reply(p, req, j):
        assert req.sampling.temperature == 0.0  # evaluation is greedy
        return f"The answer is {gold_of_task(req.messages[-1]['content'])}."
    return reply


def test_specs_add_a_frozen_base_unless_turned_off():
    algo, _ = make_algo()
    assert [(s.name, s.trainable) for s in algo.policy_specs()] == [("policy", True), ("base", False)]
    assert algo.comparisons() == [("reward", "base/reward"), ("correct", "base/correct")]
    assert algo.required_roles() == ("single",)
    algo.validate()
    algo, _ = make_algo(eval_baselines=[])
    assert [s.name for s in algo.policy_specs()] == ["policy"] and algo.comparisons() == []
    with pytest.raises(ConfigError, match=r"algo.eval_baselines.*\['base'\]"):
        GRPOConfig(eval_baselines=["init"])


def test_evaluate_policy_vs_base_with_intervals_and_reuses_the_base():
    algo, env = make_algo()
    tasks = env.tasks("test")
    gold = {t["question"]: t["answer"] for t in tasks}
    of = lambda content: next(a for q, a in gold.items() if q in content)  # noqa: E731
    policy = FakePolicy("policy", answer(of))
    base = FakePolicy("base", answer(lambda content: "-1"), trainable=False)
    algo.setup({"policy": policy, "base": base}, TrajectoryBuffer())
    out = algo.evaluate(tasks)
    n = len(tasks)
    assert out["correct"] == 1.0 and out["base/correct"] == 0.0 and out["correct/n"] == n
    assert 0 < out["correct/ci_low"] < 1.0 == out["correct/ci_high"]          # Wilson at k = n
    assert out["diff/correct-base/correct"] == 1.0 and out["diff/reward-base/reward/n"] == n
    assert [len(c) for c in policy.calls] == [n] and [len(c) for c in base.calls] == [n]  # one batch each
    algo.evaluate(tasks)
    assert len(base.calls) == 1 and len(policy.calls) == 2  # the frozen base is scored once per task set
    assert algo.eval_outcomes["base/correct"] == [0.0] * n
