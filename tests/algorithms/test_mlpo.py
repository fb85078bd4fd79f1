"""MLPO: the pure parts with fake policies (fast), plus slow end-to-end runs of the real engines.

Fast tests drive algorithms/mlpo.py with `FakePolicy` objects (tests/helpers.py) standing in for
Policy handles with scripted replies, on a small AnswerEnv with questions "Q<i>: ..." whose answer
is i. One fake object given for two policy names stands for one engine they share.
"""
from __future__ import annotations

import dataclasses
import importlib
import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FakePolicy as SharedFakePolicy

from algorithms.base import vote
from algorithms.mlpo import MLPO, TEAM_KEY, UNTRAINED, MLPOConfig, draw_team, is_easy, read_sft_file
from envs.qa import AnswerEnv, AnswerEnvConfig
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ClusterConfig, ConfigError, LearnerConfig, RolloutConfig, RunConfig, TrainerConfig,
                             load_model_preset)
from marl_llm.types import Episode, Turn

ROOT = Path(__file__).resolve().parents[2]
MAX_NEW = 16


# ---- fakes -------------------------------------------------------------------------------------
class QEnv(AnswerEnv):
    """Tasks "Q<i>: what is <i>?" with answer i; `prompts` records the (role, context) of every
    prompt (the env's own and, through `record_prompts`, MLPO's leader and team prompts)."""

    def __init__(self, n=4):
        super().__init__(AnswerEnvConfig(name="qenv", system_prompt=None))
        self.n = n
        self.prompts: list[tuple[str, dict]] = []

    def _load(self):
        tasks = [{"id": f"q{i}", "question": f"Q{i}: what is {i}?", "answer": str(i)} for i in range(self.n)]
        return tasks, [dict(t, id=f"e{t['id']}") for t in tasks]

    def prompt(self, task, role="single", **context):
        self.prompts.append((role, dict(context)))
        return super().prompt(task, role, **context)


def record_prompts(algo, env):
    """Log every leader and team prompt MLPO builds, as (role, context), in `env.prompts`."""
    for role in ("leader", "team"):
        build = getattr(algo, f"{role}_prompt")

        def recorded(task, _build=build, _role=role, **context):
            env.prompts.append((_role, dict(context)))
            return _build(task, **context)
        setattr(algo, f"{role}_prompt", recorded)


def qnum(req) -> int:
    return int(re.search(r"Q(\d+):", req.messages[-1]["content"]).group(1))


def ans(x) -> str:
    return f"<answer>{x}</answer>"


def FakePolicy(name, reply, trainable=False):
    """The shared fake (tests/helpers.py); prompt ids end with the question number."""
    return SharedFakePolicy(name, reply, trainable=trainable, prompt_ids=lambda req: [1, 2, 3, qnum(req)])


def make_run(algo_cfg, model="tiny"):
    m = load_model_preset(model)
    return RunConfig(algo=algo_cfg, env=AnswerEnvConfig(name="qenv"), model=m,
                     rollout=RolloutConfig(max_new_tokens=MAX_NEW, temperature=1.0), learner=LearnerConfig(),
                     cluster=ClusterConfig(), trainer=TrainerConfig(), seed=3)


def make_algo(leader_reply, team_replies, n_tasks=4, **kw):
    """MLPO on QEnv with one fake (one engine) per policy; the untrained leader replies as team0."""
    kw.setdefault("sft_warmup", "none")
    kw.setdefault("team_size", len(team_replies))
    kw.setdefault("team_view", "solutions")  # the paper's prompts (team_view=answers: its own test)
    cfg = MLPOConfig(**kw)
    env = QEnv(n_tasks)
    algo = MLPO(cfg, env, make_run(cfg))
    record_prompts(algo, env)
    policies = {"leader": FakePolicy("leader", leader_reply, trainable=True)}
    policies.update({f"team{k}": FakePolicy(f"team{k}", r) for k, r in enumerate(team_replies)})
    policies[UNTRAINED] = FakePolicy(UNTRAINED, team_replies[0])
    algo.setup(policies, TrajectoryBuffer())
    return algo, env, policies


def right(p, req, j):
    return f"{p.name} says {ans(qnum(req))}"


def wrong(p, req, j):
    return f"{p.name} says {ans(-1)}"


# ---- config and policies -------------------------------------------------------------------------
@pytest.mark.parametrize("kw, needle", [
    (dict(team_size=0), "algo.team_size=0"),
    (dict(prompts={"critic": "{question}"}), "unknown entries ['critic']"),
    (dict(rounds=0), "algo.rounds=0"),
    (dict(group_size=1), "algo.group_size=1"),
    (dict(easy_threshold=1.5), "algo.easy_threshold=1.5"),
    (dict(easy_threshold=0.0), "(0, 1]"),
    (dict(solo_fraction=-0.1), "algo.solo_fraction=-0.1"),
    (dict(clip_eps=0.0), "algo.clip_eps=0.0"),
    (dict(kl_coef=-1.0), "algo.kl_coef=-1.0"),
    (dict(loss_agg="mean"), "token_sum_norm"),
    (dict(sft_warmup="dpo"), "['none', 'rejection', 'file']"),
    (dict(sft_warmup="file"), "needs algo.sft_file"),
    (dict(sft_file="x.jsonl"), "use algo.sft_warmup=file"),
    (dict(eval_baselines=["single", "debate"]), "unknown entries ['debate']"),
    (dict(max_train_tasks=0), "algo.max_train_tasks=0"),
])
def test_bad_config_names_value_and_allowed(kw, needle):
    with pytest.raises(ConfigError) as e:
        MLPOConfig(**kw)
    assert needle in str(e.value)


def test_policy_specs_leader_trainable_one_frozen_spec_per_team_agent_and_untrained_leader():
    cfg = MLPOConfig(role_models={"team0": "tiny", "team1": "tiny-wide", "team2": None}, kl_coef=0.0)
    algo = MLPO(cfg, QEnv(), make_run(cfg))
    algo.validate()
    specs = {s.name: s for s in algo.policy_specs()}
    # one spec per agent: the cluster runs frozen policies with the same base weights on one engine
    assert list(specs) == ["leader", "team0", "team1", "team2", UNTRAINED]
    assert specs["leader"].trainable and not specs["leader"].reference
    assert [specs[n].trainable for n in ("team0", "team1", "team2", UNTRAINED)] == [False] * 4
    # team2 (null) and the untrained leader have `model=`
    assert [specs[n].model.name for n in ("leader", "team0", "team1", "team2", UNTRAINED)] == \
        ["tiny", "tiny", "tiny-wide", "tiny", "tiny"]
    cfg = MLPOConfig(team_size=2, role_models={"team0": "tiny-wide"}, kl_coef=0.1, eval_baselines=["single"])
    algo = MLPO(cfg, QEnv(), make_run(cfg))
    specs = algo.policy_specs()
    assert specs[0].reference and [s.name for s in specs] == ["leader", "team0", "team1"]  # no untrained baseline


@pytest.mark.parametrize("role_models, needle", [
    ({"team3": "tiny"}, "keys must be roles of ['team0', 'team1', 'team2'] (got ['team3'])"),
    ({"leader": "tiny-wide"}, "(got ['leader'])"),  # the leader is `model=`
    ({"team1": "no-such-model"}, "model preset 'no-such-model' does not exist"),
])
def test_role_models_name_team_agents_and_presets(role_models, needle):
    cfg = MLPOConfig(role_models=role_models)
    with pytest.raises(ConfigError) as e:
        MLPO(cfg, QEnv(), make_run(cfg)).validate()
    assert needle in str(e.value)


def test_a_team_agent_can_be_a_saved_model_folder(tmp_path):
    # e.g. another run's checkpoint: served as source=hf with the run's dtype and context length
    folder = tmp_path / "checkpoints" / "step_24" / "policy"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    cfg = MLPOConfig(role_models={"team0": str(folder)})
    algo = MLPO(cfg, QEnv(), make_run(cfg))
    algo.validate()
    specs = {s.name: s for s in algo.policy_specs()}
    run_model = algo.run.model
    assert (specs["team0"].model.source, specs["team0"].model.path) == ("hf", str(folder.resolve()))
    assert (specs["team0"].model.dtype, specs["team0"].model.max_model_len) == (run_model.dtype, run_model.max_model_len)
    assert specs["team1"].model == run_model
    # a path that holds no saved model is named, before any engine starts
    for bad in (tmp_path / "checkpoints", tmp_path / "missing" / "policy"):
        cfg = MLPOConfig(role_models={"team1": str(bad)})
        with pytest.raises(ConfigError, match=f"algo.role_models: '{bad}' is not a model folder"):
            MLPO(cfg, QEnv(), make_run(cfg)).validate()


def test_validate_needs_an_answer_env_and_a_readable_sft_file():
    from envs.toy import ToyConfig, ToyEnv
    cfg = MLPOConfig()
    with pytest.raises(ConfigError, match="builds its prompts on an answer env"):
        MLPO(cfg, ToyEnv(ToyConfig()), make_run(cfg)).validate()
    cfg = MLPOConfig(sft_warmup="file", sft_file="/nonexistent/x.jsonl")  # the dataclass reads no file
    with pytest.raises(ConfigError, match="does not exist"):
        MLPO(cfg, QEnv(), make_run(cfg)).validate()


# ---- prompts: MLPO's own, byte for byte the texts the env built for its leader and team roles -------
SINGLE = "Q1: what is 1?\n\nSolve the problem step by step. " \
         "End your reply with the final answer in the form <answer>ANSWER</answer>."


def user(text):
    return [{"role": "user", "content": text}]


def test_leader_and_team_prompts_are_the_texts_the_env_built():
    cfg = MLPOConfig(team_view="solutions")
    env = QEnv()
    algo = MLPO(cfg, env, make_run(cfg))
    task = env.train_tasks()[1]
    assert algo.leader_prompt(task, team_answers=[" 6 <answer>6</answer>\n", None, "7"]) == user(
        "Q1: what is 1?\n\nYour team proposed these solutions:\n\nSolution 1:\n6 <answer>6</answer>\n\n"
        "Solution 2:\n7\n\nCheck each solution for mistakes, decide which reasoning is right, and write the "
        "correct solution. End your reply with the final answer in the form <answer>ANSWER</answer>.")
    # no team answers: the leader alone gets the env's single-agent prompt, as does round 0 of the team
    assert algo.leader_prompt(task) == algo.leader_prompt(task, []) == algo.leader_prompt(task, [None]) == user(SINGLE)
    assert algo.team_prompt(task) == env.prompt(task, "single") == user(SINGLE)
    assert algo.team_prompt(task, previous="mine <answer>2</answer>", leader="lead") == user(
        "Q1: what is 1?\n\nYour previous solution:\nmine <answer>2</answer>\n\nThe team leader's analysis:\nlead"
        "\n\nUse it to revise your solution. End your reply with the final answer in the form <answer>ANSWER</answer>.")
    assert "Your previous solution:\n(none)\n\nThe team leader's analysis:\nlead\n\n" in \
        algo.team_prompt(task, leader="lead")[0]["content"]
    # the env's system prompt comes first
    env.cfg.system_prompt = AnswerEnvConfig().system_prompt
    assert algo.leader_prompt(task, ["6"])[0] == {
        "role": "system", "content": "You are a careful problem solver. Reason step by step, then give the final "
                                     "answer inside <answer></answer> tags."}
    assert algo.team_prompt(task, previous="p")[0]["role"] == "system"


def test_team_view_answers_shows_each_team_answer_as_the_vote_reads_it():
    cfg = MLPOConfig(team_view="answers")
    env = QEnv()
    algo = MLPO(cfg, env, make_run(cfg))
    task = env.train_tasks()[1]
    team = ["long reasoning ... <answer>6</answer>", None, "no tags here", "<answer> 1 </answer>"]
    assert algo.leader_prompt(task, team_answers=team) == user(
        "Q1: what is 1?\n\nYour team's final answers (some may be wrong):\nAgent 1: 6\n"
        "Agent 2: (no final answer)\nAgent 3: 1\n\nSolve the problem step by step. End your reply with the "
        "final answer in the form <answer>ANSWER</answer>.")
    # the majority vote reads the same answers from the same replies
    kept = [t for t in team if t is not None]
    assert [env.extract_answer(t) for t in kept] == ["6", None, "1"] and kept[vote(env, kept)] == kept[0]
    # the leader alone is unchanged, and a bad view is named with what is allowed
    assert algo.leader_prompt(task) == user(SINGLE)
    with pytest.raises(ConfigError, match=r"algo.team_view.*'both'.*solutions.*answers"):
        MLPOConfig(team_view="both")


def test_algo_prompts_override_one_template_and_every_reply_stops_at_the_answer():
    cfg = MLPOConfig(team_view="solutions", prompts={"leader": "{question} | {team} | {answer_instruction} {unknown}"})
    env = QEnv()
    algo = MLPO(cfg, env, make_run(cfg))
    task = env.train_tasks()[1]
    assert algo.leader_prompt(task, ["6"]) == user(
        "Q1: what is 1? | Solution 1:\n6 | End your reply with the final answer in the form <answer>ANSWER</answer>. "
        "{unknown}")
    assert algo.team_prompt(task, previous="p", leader="l")[0]["content"].startswith(
        "Q1: what is 1?\n\nYour previous solution:\np")  # the default team_revise
    names = ("leader", "team0", "team1", "team2", UNTRAINED)
    algo.setup({n: FakePolicy(n, right, trainable=n == "leader") for n in names}, TrajectoryBuffer())
    algo.evaluate(env.tasks("test"))
    reqs = [r for p in algo.policies.values() for c in p.calls for r in c]
    assert len(reqs) == 4 * (1 + 1 + 3 + 1 + 1) and all(r.sampling.stop == ["</answer>"] for r in reqs)


# ---- prepare: team answers once, easy filter ------------------------------------------------------
def test_easy_filter_drops_at_exactly_the_threshold(caplog):
    # 2 agents x 2 samples: team0 always right; team1's first sample right on q0 only (3/4 = 0.75
    # -> dropped); q1: 2/4 kept; q2: team1 both right (4/4) -> dropped; q3: 2/4 kept
    def team1(p, req, j):
        q = qnum(req)
        ok = (q == 0 and j == 0) or q == 2
        return f"team1 {ans(q if ok else -1)}"

    algo, env, pol = make_algo(right, [right, team1], easy_threshold=0.75, team_samples=2)
    with caplog.at_level(logging.INFO, logger="algorithms.mlpo"):
        kept = algo.prepare(env.train_tasks())
    assert [t["id"] for t in kept] == ["q1", "q3"]
    assert "dropped 2 task(s) as too easy" in caplog.text
    assert algo.stats["prepare/dropped_easy"] == 2 and algo.stats["prepare/kept"] == 2
    # one batched call per team agent, every task, n = team_samples; the leader is not asked
    for k in range(2):
        assert len(pol[f"team{k}"].calls) == 1
        assert [r.sampling.n for r in pol[f"team{k}"].calls[0]] == [2] * 4
    assert pol["leader"].calls == []
    # stored on the task (persisted by the trainer) and in the buffer, one episode per task
    assert kept[0][TEAM_KEY]["correct"] == [[1.0, 1.0], [0.0, 0.0]]
    assert kept[0][TEAM_KEY]["answers"][0] == ["team0 says <answer>1</answer>"] * 2
    json.dumps(kept)
    assert len(algo.buffer) == 4
    ep = algo.buffer.episodes[0]
    assert [t.agent for t in ep.turns] == ["team0", "team0", "team1", "team1"] and ep.reward == 0.75
    assert TEAM_KEY not in ep.task and ep.meta["easy"]
    assert not is_easy([[1.0, 0.0], [1.0, 0.0]], 0.75) and is_easy([[1.0, 1.0], [1.0, 0.0]], 0.75)
    assert not is_easy([[1.0, 1.0]], None)


def test_prepare_limits_and_reuses_stored_answers_and_fails_when_all_easy(caplog):
    algo, env, pol = make_algo(right, [wrong], n_tasks=6, max_train_tasks=3, easy_threshold=None)
    with caplog.at_level(logging.INFO, logger="algorithms.mlpo"):
        tasks = algo.prepare(env.train_tasks())
    assert "kept every task (algo.easy_threshold=null)" in caplog.text and "None" not in caplog.text
    assert len(tasks) == 3 and len(pol["team0"].calls[0]) == 3
    again, _, pol2 = make_algo(right, [right], n_tasks=6, easy_threshold=None)
    again.prepare(tasks)  # tasks carry 1 agent's answers: reused, only re-scored
    assert pol2["team0"].calls == []
    easy, env3, _ = make_algo(right, [right, right])
    with pytest.raises(RuntimeError, match="all 4 training tasks were dropped as too easy"):
        easy.prepare(env3.train_tasks())


# ---- collect: draws of the stored answers, solo prompts ------------------------------------------
def test_draw_team():
    rng = random.Random(0)
    for _ in range(50):
        d = draw_team([2, 3, 1], rng, 0.0, shuffle=True)
        assert sorted(k for k, _ in d) == [0, 1, 2] and all(s < n for (k, s), n in
                                                             zip(sorted(d), [2, 3, 1]))
    assert draw_team([2, 2], random.Random(0), 0.0, shuffle=False) in ([(0, 0), (1, 0)], [(0, 0), (1, 1)],
                                                                          [(0, 1), (1, 0)], [(0, 1), (1, 1)])
    assert all(draw_team([2], rng, 1.0, True) is None for _ in range(20))
    solo = sum(draw_team([2, 2], rng, 0.3, True) is None for _ in range(4000)) / 4000
    assert 0.27 < solo < 0.33
    a = [draw_team([3, 3], random.Random("x"), 0.5, True) for _ in range(3)]
    assert a[0] == a[1] == a[2]


def test_collect_prompt_holds_one_stored_answer_per_agent_or_none():
    def team(k):
        return lambda p, req, j: f"agent{k} sample{j} {ans(qnum(req) if j == 0 else -1)}"

    algo, env, pol = make_algo(right, [team(0), team(1), team(2)], team_samples=2, easy_threshold=None,
                               solo_fraction=0.0, group_size=3)
    tasks = algo.prepare(env.train_tasks())
    env.prompts.clear()
    eps = algo.collect(tasks, step=5)
    assert len(eps) == 4 * 3 and len(pol["leader"].calls) == 1
    assert [r.sampling.n for r in pol["leader"].calls[0]] == [3] * 4
    leader_ctx = [c for role, c in env.prompts if role == "leader"]
    for task, ctx, ep in zip(tasks, leader_ctx, eps[::3]):
        answers = ctx["team_answers"]
        assert sorted(a.split()[0] for a in answers) == ["agent0", "agent1", "agent2"]
        assert all(a in task[TEAM_KEY]["answers"][int(a[5])] for a in answers)
        assert not ep.meta["solo"] and len(ep.meta["draw"]) == 3
        assert ep.meta["team_correct"] == sum(task[TEAM_KEY]["correct"][k][s] for k, s in ep.meta["draw"]) / 3
    # seeded: the same step gives the same draws
    assert [e.meta["draw"] for e in algo.collect(tasks, 5)] == [e.meta["draw"] for e in eps]
    content = pol["leader"].calls[0][0].messages[-1]["content"]
    assert "Your team proposed" in content and "Solution 3" in content
    assert pol["leader"].calls[0][0].sampling.stop == ["</answer>"]
    algo.cfg.solo_fraction = 1.0
    env.prompts.clear()
    solo = algo.collect(tasks, 6)
    assert all(e.meta["solo"] and e.meta["draw"] is None for e in solo)
    assert all(c == {} for role, c in env.prompts if role == "leader")
    assert "Your team proposed" not in pol["leader"].calls[-1][0].messages[-1]["content"]


def test_collect_rejects_unprepared_tasks():
    algo, env, _ = make_algo(right, [right])
    with pytest.raises(RuntimeError, match="no stored team answers"):
        algo.collect(env.train_tasks(), 0)


# ---- update: Dr. GRPO ------------------------------------------------------------------------------
def _ep(group, reward, solo=False, team_correct=0.5):
    t = Turn(agent="leader", policy="leader", prompt_ids=[1], completion_ids=[5, 6], text="x")
    return Episode(task={"id": group}, turns=[t], reward=reward, components={"correct": reward}, group=group,
                   meta={"solo": solo, "draw": None if solo else [[0, 0]], "team_correct": None if solo else team_correct})


def test_dr_grpo_advantages_and_leader_only_loss():
    algo, _, pol = make_algo(right, [right, right], clip_eps=0.3, kl_coef=0.0)
    eps = [_ep("a", r) for r in (3.0, 1.0, 1.0, 1.0)] + [_ep("b", r, solo=True) for r in (1.0, 1.0)] + \
          [_ep("c", r, team_correct=0.0) for r in (0.0, 1.0)]
    advs = [s.advantage for s in algo.credit(eps)]
    assert advs == [1.5, -0.5, -0.5, -0.5, 0.0, 0.0, -0.5, 0.5]  # R - mean, no std division
    m = algo.update(eps, 0)
    (samples, loss), = pol["leader"].trained
    assert [s.advantage for s in samples] == advs
    assert (loss.kind, loss.agg, loss.norm_tokens, loss.clip_eps, loss.kl_coef) == \
        ("pg", "token_sum_norm", MAX_NEW, 0.3, 0.0)
    assert all(p.trained == [] for n, p in pol.items() if n != "leader")
    assert m["reward/solo"] == 1.0 and m["reward/with_team"] == pytest.approx(7 / 6)
    assert m["reward/team_all_wrong"] == 0.5 and m["groups/mixed"] == pytest.approx(2 / 3)


# ---- SFT warm-up ------------------------------------------------------------------------------------
def test_rejection_sampling_trains_on_correct_well_formed_syntheses_then_syncs():
    def leader(p, req, j):  # sample 0 right, sample 1 right but badly formed, sample 2 wrong
        return [f"so {ans(qnum(req))}", f"{qnum(req)}", f"so {ans(-1)}"][j]

    algo, env, pol = make_algo(leader, [wrong], sft_warmup="rejection", sft_samples=3, easy_threshold=None,
                               sft_batch_size=3, kl_coef=0.1)
    algo.prepare(env.train_tasks())
    batches = [s for s, _ in pol["leader"].trained]
    assert [len(b) for b in batches] == [3, 1]  # 4 tasks x 1 kept syntheses, in batches of 3
    assert all(loss.kind == "sft" for _, loss in pol["leader"].trained)
    assert pol["leader"].synced == 1 and pol["leader"].snapshots == 1
    assert algo.stats["sft/examples"] == 4 and algo.stats["sft/sampled"] == 12
    assert algo._report["sft/steps"] == 2
    m = algo.update([_ep("a", 1.0), _ep("a", 0.0)], 0)
    assert m["sft/examples"] == 4 and "sft/examples" not in algo.update([_ep("a", 1.0), _ep("a", 0.0)], 1)


def test_sft_file_format_and_errors(tmp_path):
    f = tmp_path / "sft.jsonl"
    good = [{"task": {"id": "x", "question": "Q7: what is 7?", "answer": "7"}, "team_answers": ["6", "7"],
             "completion": "Solution 2 is right. <answer>7</answer>"},
            {"messages": [{"role": "user", "content": "hi"}], "completion": "<answer>1</answer>"},
            {"prompt": "Q1: what is 1?", "completion": "<answer>1</answer>"}]
    f.write_text("\n".join(json.dumps(x) for x in good) + "\n")
    assert len(read_sft_file(str(f))) == 3
    assert MLPOConfig(sft_warmup="file", sft_file=str(f)).sft_file == str(f)
    for bad, needle in [("not json", "not valid JSON"), ("[1]", "not a JSON object"),
                        ('{"prompt": "p"}', "missing or empty 'completion'"),
                        ('{"prompt": "p", "messages": [], "completion": "c"}', "has prompt fields"),
                        ('{"completion": "c"}', "has prompt fields []"),
                        ('{"prompt": "p", "team_answers": ["a"], "completion": "c"}', "goes with 'task'"),
                        ('{"messages": [{"role": "user"}], "completion": "c"}', "'messages' must be")]:
        f.write_text(bad + "\n")
        with pytest.raises(ConfigError, match=re.escape(needle)) as e:
            read_sft_file(str(f))
        # a line that is no JSON object is named by its line, a bad example by its place in the file
        assert (f"{f} line 1" if needle.startswith("not ") else f"{f}, example 1") in str(e.value)
    f.write_text("\n\n")
    with pytest.raises(ConfigError, match="holds no examples"):
        read_sft_file(str(f))

    def tokenize(messages, completion):  # the leader's engine: one id per word, then EOS (0)
        text = "|".join(m["content"] for m in messages) + "|assistant:"
        return [len(w) for w in text.split()], [len(w) for w in completion.split()] + [0]

    f.write_text("\n".join(json.dumps(x) for x in good) + "\n")
    algo, env, pol = make_algo(right, [wrong], sft_warmup="file", sft_file=str(f), easy_threshold=None)
    pol["leader"].tokenize = tokenize
    env.prompts.clear()
    algo.prepare(env.train_tasks())
    (samples, loss), = pol["leader"].trained
    assert loss.kind == "sft" and len(samples) == 3 and all(s.completion_ids[-1] == 0 for s in samples)
    assert ("leader", {"team_answers": ["6", "7"]}) in env.prompts
    # the task example's prompt is MLPO's leader prompt over its team answers
    assert tokenize(algo.leader_prompt(good[0]["task"], team_answers=["6", "7"]), "")[0] in \
        [s.prompt_ids for s in samples]


# ---- evaluate: the T-round protocol and baselines -------------------------------------------------
def _protocol_algo(rounds=3):
    """Team: round 0 wrong, revisions right. Trained leader: the team's majority. The untrained
    leader (replying as the team does) is always wrong. Single agent = round-0 team = wrong."""
    def team(p, req, j):
        c = req.messages[-1]["content"]
        if "Your team proposed" in c:  # the untrained leader
            return f"{p.name}-as-leader#{SharedFakePolicy.counter} {ans(-2)}"
        ok = "Your previous solution" in c
        return f"{p.name}#{SharedFakePolicy.counter} {ans(qnum(req) if ok else -1)}"

    def leader(p, req, j):
        c = req.messages[-1]["content"]
        found = re.findall(r"<answer>(-?\d+)</answer>", c)
        best = max(set(found), key=found.count) if found else "-3"
        return f"leader#{SharedFakePolicy.counter} {ans(best)}"

    return make_algo(leader, [team, team], n_tasks=3, rounds=rounds)


def test_round_protocol_contexts_batches_and_counts():
    algo, env, pol = _protocol_algo(rounds=3)
    tasks = env.tasks("test")
    env.prompts.clear()
    traces = algo.run_rounds(tasks, {"": "leader", "untrained_": UNTRAINED})
    K, n = 2, len(tasks)
    # one batched call per team engine per round (round 0 shared by both variants), then the leaders
    assert [len(c) for c in pol["team1"].calls] == [n, 2 * n, 2 * n]
    assert [len(c) for c in pol["team0"].calls] == [n, 2 * n, 2 * n]
    assert [len(c) for c in pol["leader"].calls] == [n] * 3
    assert [len(c) for c in pol[UNTRAINED].calls] == [n] * 3
    team_ctx = [c for role, c in env.prompts if role == "team"]
    leader_ctx = [c for role, c in env.prompts if role == "leader"]
    assert team_ctx[: K * n] == [{}] * (K * n)  # round 0: the team answers alone
    for v, tr in traces.items():
        assert len(tr) == 3
        assert tr[0].team == traces[""][0].team  # round 0 is shared by the variants
        for t in range(3):
            for i in range(n):
                want = {"team_answers": [tr[t].team[k][i].text for k in range(K)]}
                assert want in leader_ctx
                for k in range(K):
                    if t > 0:
                        assert {"previous": tr[t - 1].team[k][i].text,
                                "leader": tr[t - 1].leader[i].text} in team_ctx
    # the revision of the trained variant saw the trained leader, the untrained one its own leader
    assert traces[""][0].leader[0].text.startswith("leader#")
    assert traces["untrained_"][0].leader[0].text.startswith(f"{UNTRAINED}-as-leader#")


def test_agents_on_one_engine_go_out_as_one_batch_in_agent_order():
    """team0, team2 and the untrained leader share one engine (one fake): each round's team
    requests go to it as one batch, team0's before team2's, and come back to the right agent."""
    def seeded(p, req, j):
        return f"seed{req.sampling.seed} {ans(-1)}"

    algo, env, pol = make_algo(right, [seeded, right, seeded], easy_threshold=None, team_samples=1, rounds=2)
    shared = pol["team0"]
    algo.setup({**pol, "team2": shared, UNTRAINED: shared}, TrajectoryBuffer())
    tasks = algo.prepare(env.train_tasks())
    n = len(tasks)
    (batch,) = shared.calls
    assert [r.sampling.seed for r in batch] == [algo.seed("team", k, i) for k in (0, 2) for i in range(n)]
    assert [t[TEAM_KEY]["answers"][2][0].split()[0] for t in tasks] == [f"seed{algo.seed('team', 2, i)}"
                                                                         for i in range(n)]
    assert len(pol["team1"].calls) == 1
    shared.calls.clear()
    algo.evaluate(env.tasks("test"))
    # single baseline; round 0: team0 + team2 in one batch; the untrained leader; round 1: both
    # variants' revisions of team0, then of team2, in one batch; the untrained leader
    assert [len(c) for c in shared.calls] == [n, 2 * n, n, 4 * n, n]
    assert [r.sampling.seed for r in shared.calls[3]] == [algo.seed("eval", 1, k, i) for k in (0, 2)
                                                          for _ in range(2) for i in range(n)]


def test_evaluate_reports_rounds_generations_and_baselines():
    algo, env, pol = _protocol_algo(rounds=3)
    out = algo.evaluate(env.tasks("test"))
    assert [out[f"acc/round{t}"] for t in range(3)] == [0.0, 1.0, 1.0]
    assert out["acc/final"] == 1.0 and out["reward"] == 1.0
    assert [out[f"gens/round{t}"] for t in range(3)] == [3.0, 6.0, 9.0]  # K+1 per round
    assert [out[f"acc/team_round{t}"] for t in range(3)] == [0.0, 1.0, 1.0]
    assert out["acc/untrained_final"] == 0.0 and out["acc/untrained_round0"] == 0.0
    assert out["acc/leader_alone"] == 0.0 and out["gens/leader_alone"] == 1.0
    assert out["acc/single"] == 0.0 and out["gens/single"] == 1.0
    assert out["acc/majority"] == 0.0 and out["gens/majority"] == 2.0
    assert out["frac/team_round0_all_wrong"] == 1.0 and out["acc/final_when_team_all_wrong"] == 1.0
    # tokens: every completion here is 2 words long: (K + 1) * 2 per task per round
    assert [out[f"tokens/round{t}"] for t in range(3)] == [6.0, 12.0, 18.0]
    assert out["tokens/majority"] == 4.0 and out["tokens/single"] == 2.0
    # leader-alone and single baselines are greedy
    alone = [r for c in pol["leader"].calls for r in c if "Your team proposed" not in r.messages[-1]["content"]]
    assert len(alone) == 3 and all(r.sampling.temperature == 0.0 for r in alone)


def test_evaluate_without_the_untrained_baseline_asks_no_untrained_leader():
    algo, env, pol = _protocol_algo(rounds=1)
    algo.cfg.eval_baselines = ["single", "majority"]
    out = algo.evaluate(env.tasks("test"))
    assert not any(k.startswith("acc/untrained") for k in out) and "acc/final" in out
    assert pol[UNTRAINED].calls == [] and "diff/acc/final-acc/majority" in out


def test_majority_vote():
    env = QEnv()
    assert vote(env, [ans(3), ans(4), ans(3)]) == 0
    assert vote(env, [ans(4), ans(3), ans(3)]) == 1
    assert vote(env, [ans(4), ans(3)]) == 0  # tie: the answer seen first
    assert vote(env, ["no answer", ans(5)]) == 1
    assert vote(env, ["none", ""]) is None
    from envs.math import MathConfig, MathEnv
    menv = MathEnv(MathConfig(source="generator", train_size=1, eval_size=1))
    assert vote(menv, [ans(5), ans("3.0"), ans(3)]) == 1  # equivalence via answers_equal


def test_state_dict_roundtrip():
    algo, env, _ = make_algo(right, [wrong], easy_threshold=None)
    algo.prepare(env.train_tasks())
    other, _, _ = make_algo(right, [wrong])
    other.load_state_dict(json.loads(json.dumps(algo.state_dict())))
    assert other.stats == algo.stats and other.stats["prepare/kept"] == 4


# ---- slow: the real engines ---------------------------------------------------------------------
def _engines_or_skip():
    for mod in ("marl_llm.rollout.worker", "marl_llm.learner.group"):
        try:
            importlib.import_module(mod)
        except Exception as e:  # noqa: BLE001 - any import failure means the engine is not usable
            pytest.skip(f"engine module {mod} cannot be imported ({type(e).__name__}: {e})")


@pytest.mark.slow
@pytest.mark.engine
def test_e2e_two_steps_heterogeneous_team(tmp_path):
    """2 steps of `algo=mlpo env=math model=tiny` with a heterogeneous team and a file SFT warm-up:
    only the leader is checkpointed; team answers are stored; evaluation reports every round."""
    _engines_or_skip()
    sft = tmp_path / "sft.jsonl"
    sft.write_text("".join(json.dumps({"task": {"id": f"s{i}", "question": f"What is {i} + 1?", "answer": str(i + 1)},
                                       "team_answers": [str(i + 1), str(i)],
                                       "completion": f"Solution 1 is right: {i} + 1 = {i + 1}. <answer>{i + 1}</answer>"})
                           + "\n" for i in range(4)))
    out = tmp_path / "run"
    cmd = [sys.executable, "-m", "marl_llm.train", "algo=mlpo", "env=math", "model=tiny",
           "+algo.role_models.team1=tiny-wide", "trainer.steps=2", "trainer.batch_size=2",
           "trainer.save_every=2", "trainer.eval_every=2", "trainer.eval_size=2", "trainer.progress=false",
           "trainer.loggers=[]", f"trainer.output_dir={out}", "env.train_size=16", "env.eval_size=4",
           "algo.max_train_tasks=6", "algo.team_samples=2", "algo.group_size=2", "algo.rounds=2",
           "algo.easy_threshold=null", "algo.sft_warmup=file", f"algo.sft_file={sft}", "algo.sft_batch_size=2",
           "rollout.max_new_tokens=16", "learner.micro_batch_size=4"]
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", RAY_AUTH_MODE="disabled")
    p = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1500)
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-6000:]
    step = out / "checkpoints" / "step_2"
    assert (step / "leader").is_dir() and any((step / "leader").iterdir())
    assert not [d.name for d in step.iterdir() if d.name.startswith(("team", UNTRAINED))]
    assert not [d for d in (step / "_deepspeed").iterdir() if d.name.startswith(("team", UNTRAINED))]
    tasks = [json.loads(l) for l in (out / "train_tasks.jsonl").read_text().splitlines()]
    assert len(tasks) == 6 and all(len(t[TEAM_KEY]["answers"]) == 3 for t in tasks)
    buf = [json.loads(l) for l in (out / "buffer.jsonl").read_text().splitlines()]
    assert sum(e["meta"].get("phase") == "team_answers" for e in buf) == 6
    recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert recs[0]["sft/examples"] == 4 and recs[0]["prepare/kept"] == 6
    for k in ("eval/acc/round0", "eval/acc/round1", "eval/gens/round1", "eval/acc/leader_alone",
              "eval/acc/single", "eval/acc/majority", "eval/acc/untrained_final"):
        assert k in recs[-1], (k, sorted(recs[-1]))
    assert recs[-1]["eval/gens/round1"] == 8.0


# learning signal: the team's stored answers carry the information the leader needs --------------
class SecretEnv(AnswerEnv):
    """"What is the secret number?" — a random 3-digit number per task that only the team knows:
    the tasks come with K=3 agents' answers already stored (MLPO reuses stored answers, so the
    frozen team model does not matter), two agents give the secret and one a wrong number (a
    different agent per task). The leader cannot guess (chance 1/900), so every reward it earns
    comes from reading and weighing the team's answers. Reward: 1 if its final number (last
    <answer>, else last number, as env=math reads it) is the secret.

    Why not the tiny random model: its outputs are near-uniform over a 49k-token vocabulary, so
    any reward on the text is a property of individual tokens it samples about once per run; we
    measured no movement in 60 steps (lr 5e-3) even on a dense letter-share reward that needs
    the team. A pretrained model (SmolLM2-135M-Instruct) can copy, so RL shapes which number it
    copies and how it ends its reply."""

    def __init__(self, cfg, seed=0, n=64):
        super().__init__(cfg, seed)
        self.n = n

    def _load(self):
        def task(i, split):
            rng = random.Random(f"{split}{i}")
            secret, other = rng.sample(range(100, 1000), 2)
            liar = i % 3
            answers = [[f"<answer>{other if k == liar else secret}</answer>"] * 2 for k in range(3)]
            return {"id": f"{split}{i}", "question": "What is the secret number?", "answer": str(secret),
                    TEAM_KEY: {"answers": answers}}
        return [task(i, "t") for i in range(self.n)], [task(i, "e") for i in range(16)]

    def extract_answer(self, text):
        from envs.qa import extract_final, last_number
        a = extract_final(text)
        return a if a is not None else last_number(text)


@pytest.mark.slow
@pytest.mark.engine
def test_learning_signal_leader_learns_to_use_team_answers(tmp_path):
    """SmolLM2-135M leader over stored team answers that hold the secret (2 of 3 agents right):
    the leader's reward rises clearly within a bounded number of steps. Knobs (env vars):
    MLPO_SIGNAL_MODEL (smollm2-135m), MLPO_SIGNAL_STEPS (16), MLPO_SIGNAL_LR (2e-5).
    Measured (2 shared CPU cores, ~40 s/step): reward with team 0.125, 0.31, 0.31, 0.62, 0.62,
    0.56, 0.81, 0.56 over steps 1-8 (the leader learns to end with the majority's number)."""
    _engines_or_skip()
    from marl_llm.config import validate
    from marl_llm.registry import ENVS, register_env
    from marl_llm.trainer import Trainer

    if "mlpo_secret" not in ENVS:
        register_env("mlpo_secret")(SecretEnv)
    steps = int(os.environ.get("MLPO_SIGNAL_STEPS", "16"))
    model = dataclasses.asdict(load_model_preset(os.environ.get("MLPO_SIGNAL_MODEL", "smollm2-135m")))
    cfg = {"algo": {"name": "mlpo", "team_size": 3, "team_samples": 2, "easy_threshold": None,
                    "sft_warmup": "none", "solo_fraction": 0.0, "group_size": 4, "rounds": 1,
                    "max_train_tasks": None},
           "env": {"name": "mlpo_secret", "system_prompt": None},
           "model": model,
           "rollout": {"backend": "vllm", "max_new_tokens": 32, "temperature": 0.7, "top_p": 0.9},
           "learner": {"lr": float(os.environ.get("MLPO_SIGNAL_LR", "2e-5")), "micro_batch_size": 16,
                       "bf16": "false"},
           "trainer": {"steps": steps, "batch_size": 4, "save_every": 0, "eval_every": 0, "test": False,
                       "output_dir": str(tmp_path / "run"), "progress": False, "loggers": []},
           "seed": 0}
    Trainer(validate(cfg)).fit()
    recs = [json.loads(l) for l in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    r = [x["reward/with_team"] for x in recs]
    first, last = sum(r[:3]) / 3, sum(r[-5:]) / 5
    assert last > first + 0.25, \
        f"leader reward with team did not rise: first {first:.3f} -> last {last:.3f} ({[round(x, 3) for x in r]})"


def test_evaluate_reports_intervals_and_paired_comparisons():
    algo, env, pol = _protocol_algo(rounds=2)
    out = algo.evaluate(env.tasks("test"))
    n = len(env.tasks("test"))
    for key in ("acc/final", "acc/untrained_final", "acc/leader_alone", "acc/single", "acc/majority", "reward",
                "acc/team_round1"):
        assert out[f"{key}/n"] == n and out[f"{key}/ci_low"] <= out[key] <= out[f"{key}/ci_high"], key
    # trained leader + team right on every task, the untrained leader and the baselines never
    assert out["diff/acc/final-acc/untrained_final"] == 1.0
    assert out["diff/acc/final-acc/majority"] == 1.0 and out["diff/acc/final-acc/majority/n"] == n
    assert out["diff/acc/leader_alone-acc/single"] == 0.0
    assert out["diff/acc/leader_alone-acc/single/ci_low"] == out["diff/acc/leader_alone-acc/single/ci_high"] == 0.0
    assert "gens/round1/n" not in out  # costs carry no interval
    assert algo.eval_outcomes["acc/final"] == [1.0] * n
