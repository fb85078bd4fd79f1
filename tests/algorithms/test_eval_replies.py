"""Every evaluation keeps the replies behind its compared metrics: saved next to outcomes.json,
re-scorable (re-scoring a saved file reproduces the logged scores), with the strict and lenient
readings on answer envs (`noanswer/`, `lenient/` outcomes and their paired differences) and
decoding labels that say greedy only at temperature 0. Driven through the real evaluate paths
with fake policies (tests/helpers.py), no engine."""
from __future__ import annotations

import json
import re

import pytest
from helpers import FakePolicy

from algorithms.base import decoding_label, outcome_metrics, reply_rows
from algorithms.grpo import GRPO, GRPOConfig
from algorithms.magrpo import MAGRPO, MAGRPOConfig
from algorithms.malt import MALT, MALTConfig
from algorithms.mlpo import MLPO, UNTRAINED, MLPOConfig
from envs.base import make_env
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ClusterConfig, ConfigError, LearnerConfig, RolloutConfig, RunConfig, TrainerConfig,
                             load_model_preset)
from marl_llm.eval_store import OUTCOMES, read_replies, replies_file, replies_path, rescore, save_evaluation
from marl_llm.report import baselines
from marl_llm.stats import differences
from marl_llm.types import GenerationRequest

SEED = 7
ROW_FIELDS = {"task_id", "task", "role", "prompt", "reply", "temperature", "seed", "scored", "score"}
ANSWER_FIELDS = {"answer", "lenient_answer", "lenient_score"}


def run_of(cfg, env):
    return RunConfig(algo=cfg, env=env.cfg, model=load_model_preset("tiny"), rollout=RolloutConfig(),
                     learner=LearnerConfig(), cluster=ClusterConfig(), trainer=TrainerConfig(), seed=SEED)


def math_env():
    return make_env({"name": "math", "train_size": 4, "eval_size": 6})


def gold_reader(env):
    """The gold answer of the math task whose question is in a request's last message."""
    gold = {t["question"]: t["answer"] for t in env.tasks("test")}
    return lambda req: next(a for q, a in gold.items() if q in req.messages[-1]["content"])


def grpo_on_math():
    """GRPO on env=math: the policy answers in tags on even tasks and as a bare equation on odd
    ones (right, but no readable answer); the base model answers -1 in free text."""
    env = math_env()
    cfg = GRPOConfig()
    algo = GRPO(cfg, env, run_of(cfg, env))
    gold = gold_reader(env)
    tasks = env.tasks("test")
    index = {t["question"]: i for i, t in enumerate(tasks)}

    def policy(p, req, j):
        i = next(k for q, k in index.items() if q in req.messages[-1]["content"])
        return f"<answer>{gold(req)}</answer>" if i % 2 == 0 else f"so 1 + 1 = {gold(req)}"

    pols = {"policy": FakePolicy("policy", policy), "base": FakePolicy("base", lambda p, r, j: "The answer is -1.",
                                                                      trainable=False)}
    algo.setup(pols, TrajectoryBuffer())
    return algo, env, tasks, pols


def test_lenient_outcomes_grade_a_lenient_reading_that_differs_from_a_found_strict_one():
    # reasoning_gym reads an untagged reply's last line (strict) but its last number (lenient):
    # the lenient outcome is the scorer's grade of that number, not the strict reading's score
    env = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 4, "eval_size": 4})
    cfg = GRPOConfig()
    algo = GRPO(cfg, env, run_of(cfg, env))
    tasks = env.tasks("test")
    gold = {t["question"]: t["answer"] for t in tasks}
    reply = lambda p, req, j: "so\nThe answer is " + next(a for q, a in gold.items() if q in req.messages[-1]["content"])
    algo.setup({"policy": FakePolicy("policy", reply),
                "base": FakePolicy("base", lambda p, r, j: "<answer>12345</answer>", trainable=False)}, TrajectoryBuffer())
    algo.evaluate(tasks)
    rows = algo.eval_replies["correct"]
    assert all(r["answer"].startswith("The answer is") and r["lenient_answer"] == t["answer"] for r, t in zip(rows, tasks))
    assert all(r["score"] < 1.0 for r in rows) and [r["lenient_score"] for r in rows] == [1.0] * 4
    assert algo.eval_outcomes["lenient/correct"] == [1.0] * 4 and algo.eval_outcomes["correct"] == [r["score"] for r in rows]
    assert algo.eval_outcomes["lenient/base/correct"] == algo.eval_outcomes["base/correct"]  # tagged: one reading


def test_grpo_replies_carry_every_field_and_the_logged_score():
    algo, env, tasks, _ = grpo_on_math()
    out = algo.evaluate(tasks)
    assert set(algo.eval_replies) == {"correct", "base/correct"}
    rows = algo.eval_replies["correct"]
    assert [r["task_id"] for r in rows] == [t["id"] for t in tasks] and [r["task"] for r in rows] == tasks
    for row in rows:
        assert set(row) == ROW_FIELDS | ANSWER_FIELDS
        assert row["role"] == "single" and row["scored"] == "correct" and row["temperature"] == 0.0
        assert row["prompt"] == env.prompt(row["task"], "single") and row["seed"] is None  # greedy: unseeded
    assert [r["score"] for r in rows] == algo.eval_outcomes["correct"] == [1.0, 0.0] * 3
    assert [r["answer"] for r in rows[:2]] == [tasks[0]["answer"], None]
    assert [r["lenient_answer"] for r in rows[:2]] == [tasks[0]["answer"], tasks[1]["answer"]]
    # the readings: half the replies have no readable answer, every one is right when read leniently
    assert out["correct"] == 0.5 and out["noanswer/correct"] == 0.5 and out["lenient/correct"] == 1.0
    assert out["lenient/correct/n"] == 6 and out["noanswer/correct/ci_high"] <= 1.0
    assert out["base/correct"] == 0.0 and out["noanswer/base/correct"] == 0.0 and out["lenient/base/correct"] == 0.0
    assert out["diff/correct-base/correct"] == 0.5 and out["diff/lenient/correct-lenient/base/correct"] == 1.0
    assert "diff/noanswer/correct-noanswer/base/correct" not in out  # no answer is a share, not a comparison
    assert algo.eval_decoding() == {"correct": "greedy", "base/correct": "greedy"}


def test_saved_replies_reread_and_rescore_to_the_logged_scores(tmp_path):
    algo, env, tasks, pols = grpo_on_math()
    algo.evaluate(tasks)
    folder = tmp_path / "eval" / "test" / "step_2"
    save_evaluation(folder, tasks, algo)
    saved = json.loads((folder / OUTCOMES).read_text())
    assert saved["replies"] == {"correct": "replies/correct.jsonl", "base/correct": "replies/base.correct.jsonl"}
    assert saved["decoding"] == {"correct": "greedy", "base/correct": "greedy"}
    assert saved["outcomes"]["noanswer/correct"] == [0.0, 1.0] * 3
    for name in ("correct", "base/correct"):
        rows = read_replies(folder, name)
        assert rows == algo.eval_replies[name]
        assert rescore(replies_path(folder, name), env) == saved["outcomes"][name]
        fresh = math_env()  # a new env: the saved task dicts suffice
        assert rescore(replies_path(folder, name), fresh) == saved["outcomes"][name]
    # a second evaluation reuses the frozen base's result, and still saves its replies
    algo.evaluate(tasks)
    assert len(pols["base"].calls) == 1 and set(algo.eval_replies) == {"correct", "base/correct"}
    with pytest.raises(ConfigError, match=r"no replies of metric 'reward'.*\['base/correct', 'correct'\]"):
        replies_path(folder, "reward")


def test_rescore_scores_the_saved_reply_not_the_saved_score(tmp_path):
    algo, env, tasks, _ = grpo_on_math()
    algo.evaluate(tasks)
    save_evaluation(tmp_path, tasks, algo)
    path = replies_path(tmp_path, "correct")
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    rows[1]["reply"] = f"<answer>{rows[1]['task']['answer']}</answer>"  # now readable and right
    rows[0]["score"] = -5.0  # a stored score is never read back as the score
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert rescore(path, env)[:2] == [1.0, 1.0]


def test_toy_env_replies_are_scored_by_the_reward_without_answer_fields(tmp_path):
    env = make_env({"name": "toy", "train_size": 2, "eval_size": 3})
    cfg = GRPOConfig()
    algo = GRPO(cfg, env, run_of(cfg, env))
    algo.setup({"policy": FakePolicy("policy", lambda p, r, j: "aeiou xyz"),
                "base": FakePolicy("base", lambda p, r, j: "xyz", trainable=False)}, TrajectoryBuffer())
    tasks = env.tasks("test")
    out = algo.evaluate(tasks)
    assert set(algo.eval_replies) == {"reward", "base/reward"}
    assert set(algo.eval_replies["reward"][0]) == ROW_FIELDS and algo.eval_replies["reward"][0]["scored"] == "reward"
    assert not any(k.startswith(("lenient/", "noanswer/")) for k in out)
    save_evaluation(tmp_path, tasks, algo)
    assert rescore(replies_path(tmp_path, "reward"), env) == algo.eval_outcomes["reward"] == [5 / 8] * 3


def test_magrpo_keeps_one_joint_reply_per_task_for_the_pair_and_each_baseline(tmp_path):
    env = make_env({"name": "toy", "train_size": 2, "eval_size": 3})
    cfg = MAGRPOConfig(eval_baselines=["naive", "sequential"])
    algo = MAGRPO(cfg, env, run_of(cfg, env))
    base = FakePolicy("base", lambda p, r, j: "aaxx", trainable=False)
    algo.setup({"agent1": FakePolicy("agent1", lambda p, r, j: "aaaa"),
                "agent2": FakePolicy("agent2", lambda p, r, j: "xxxx"),
                "base-agent1": base, "base-agent2": base}, TrajectoryBuffer())
    tasks = env.tasks("test")
    algo.evaluate(tasks)
    assert set(algo.eval_replies) == {"reward", "naive/reward", "sequential/reward"}  # every compared method
    row = algo.eval_replies["reward"][0]
    assert row["role"] == ["agent1", "agent2"] and row["reply"] == {"agent1": "aaaa", "agent2": "xxxx"}
    assert set(row["prompt"]) == {"agent1", "agent2"} and row["temperature"] == {"agent1": 0.0, "agent2": 0.0}
    assert algo.eval_outcomes["reward"] == [1.0] * 3 and algo.eval_outcomes["naive/reward"] == [0.25] * 3
    save_evaluation(tmp_path, tasks, algo)
    for name in algo.eval_replies:
        assert rescore(replies_path(tmp_path, name), env) == algo.eval_outcomes[name]
    assert algo.eval_decoding()["sequential/reward"] == "greedy"


def test_mlpo_keeps_every_compared_policy_and_labels_the_sampled_team():
    env = math_env()
    cfg = MLPOConfig(team_size=2, rounds=1)
    algo = MLPO(cfg, env, run_of(cfg, env))
    gold = gold_reader(env)
    team = FakePolicy("team", lambda p, r, j: f"I get {gold(r)}", trainable=False)  # right, but no readable answer
    algo.setup({"leader": FakePolicy("leader", lambda p, r, j: f"<answer>{gold(r)}</answer>"), "team0": team,
                "team1": team, UNTRAINED: FakePolicy(UNTRAINED, lambda p, r, j: "The answer is -1.", trainable=False)},
               TrajectoryBuffer())
    tasks = env.tasks("test")
    out = algo.evaluate(tasks)
    compared = {name for pair in algo.comparisons() for name in pair}
    assert compared <= set(algo.eval_replies)
    assert {"team_round0/team0", "team_round0/team1"} <= set(algo.eval_replies)
    for name in compared:
        assert [r["score"] for r in algo.eval_replies[name]] == algo.eval_outcomes[name]
    assert out["acc/majority"] == 0.0 and out["noanswer/acc/majority"] == 1.0 and out["lenient/acc/majority"] == 1.0
    majority = algo.eval_replies["acc/majority"][0]
    assert majority["candidates"] == [majority["reply"]] * 2 and majority["temperature"] == cfg.team_temperature
    assert isinstance(majority["seed"], int)  # sampled: the request's own seed, derived from the run seed
    assert out["diff/lenient/acc/final-lenient/acc/majority"] == 0.0 and out["diff/acc/final-acc/majority"] == 1.0
    labels = algo.eval_decoding()
    assert labels["acc/final"] == f"leader greedy; team temperature 0.3, seed {SEED}"
    assert labels["acc/untrained_final"] == labels["acc/final"]
    assert labels["acc/single"] == labels["acc/leader_alone"] == "greedy"
    assert labels["acc/majority"] == labels["team_round0/team1"] == f"temperature 0.3, seed {SEED}"


def test_malt_keeps_each_votes_replies_and_labels_the_sampled_chains():
    env = math_env()
    cfg = MALTConfig(baselines="frozen", eval_ablations=False)
    algo = MALT(cfg, env, run_of(cfg, env))
    gold = gold_reader(env)
    replies = {"generator": lambda r: "The answer is -1.", "verifier": lambda r: "incorrect",
               "refiner": lambda r: f"so 2 + 2 = {gold(r)}"}  # right, but no readable answer
    pols = {role: FakePolicy(role, lambda p, r, j, f=f: f(r)) for role, f in replies.items()}
    base = FakePolicy("base", lambda p, r, j: f"<answer>{gold(r)}</answer>", trainable=False)
    algo.setup({**pols, "base": base}, TrajectoryBuffer())
    tasks = env.tasks("test")
    out = algo.evaluate(tasks)
    assert set(algo.eval_replies) == {"mv/gvr", "mv/g", "baseline/mv/gvr", "baseline/mv/g"}
    row = algo.eval_replies["mv/gvr"][0]
    assert row["role"] == "refiner" and len(row["candidates"]) == cfg.chains and row["reply"] == row["candidates"][0]
    assert out["mv/gvr"] == 0.0 and out["noanswer/mv/gvr"] == 1.0 and out["lenient/mv/gvr"] == 1.0
    assert out["diff/lenient/mv/gvr-lenient/baseline/mv/gvr"] == 0.0 and out["diff/mv/gvr-baseline/mv/gvr"] == -1.0
    assert algo.eval_decoding()["mv/gvr"] == f"temperature 0.3, seed {SEED}"
    calls = len(base.calls)
    algo.evaluate(tasks)  # the frozen baseline is reused, its replies too
    assert len(base.calls) == calls and set(algo.eval_replies) >= {"baseline/mv/gvr", "baseline/mv/g"}


def test_lenient_differences_read_back_as_pairs_for_summaries_and_the_report():
    outcomes = {"correct": [1, 0, 0], "base/correct": [0, 0, 0],
                "lenient/correct": [1, 1, 0], "lenient/base/correct": [0, 1, 0], "noanswer/correct": [0, 1, 0]}
    m = outcome_metrics(outcomes, [("correct", "base/correct"), ("reward", "base/reward")])
    pairs = [(a, b) for a, b, _ in differences(m)]
    assert pairs == [("correct", "base/correct"), ("lenient/correct", "lenient/base/correct")]
    assert m["diff/lenient/correct-lenient/base/correct"] == pytest.approx(1 / 3)
    assert outcome_metrics({"a": [1], "b": [0], "lenient/a": [1]}, [("a", "b")]).keys().isdisjoint(
        {"diff/lenient/a-lenient/b"})  # both need a lenient version
    known = baselines([f"eval/{k}" for k in m])
    assert known["lenient/base/correct"][0] == "lenient/correct" and known["base/correct"][0] == "correct"


@pytest.mark.parametrize("temps, label", [([0.0], "greedy"), ([0.3, 0.3], f"temperature 0.3, seed {SEED}"),
                                          ([0.0, 0.7], f"greedy and temperature 0.7, seed {SEED}")])
def test_decoding_labels_say_greedy_only_at_temperature_zero(temps, label):
    assert decoding_label(temps, SEED) == label


def test_reply_rows_need_one_request_reply_and_score_per_task_and_safe_file_names():
    env = make_env({"name": "toy", "train_size": 1, "eval_size": 2})
    tasks = env.tasks("test")
    req = GenerationRequest(messages=[{"role": "user", "content": "hi"}])
    with pytest.raises(ValueError, match=r"per task \(2 tasks\).*'single': \(1, 2\)"):
        reply_rows(env, tasks, {"single": ([req], ["a", "b"])}, [0.0, 1.0], "reward")
    with pytest.raises(ValueError, match="1 scores"):
        reply_rows(env, tasks, {"single": ([req, req], ["a", "b"])}, [0.0], "reward")
    assert replies_file("acc/final") == "acc.final.jsonl"
    assert replies_file("team_round0/team1") == "team_round0.team1.jsonl"
    assert re.fullmatch(r"[\w.-]+", replies_file("a b/c:d"))
