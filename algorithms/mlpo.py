"""MLPO: train only a leader that coordinates a frozen team (arXiv 2507.08960).

What the paper specifies: K frozen team agents (K=3) answer a task; a leader model reads the task
and the team's answers and writes the final solution; only the leader is trained, first with SFT,
then with GRPO using the Dr. GRPO changes (A = R - group mean, no std division; token sums over a
constant instead of per-sample lengths); tasks that the team already solves (>= 75% correct team
answers) are dropped; at inference the team and the leader iterate for T rounds (T=5), the team
revising after reading the leader's previous output; the trained leader also answers alone.

Where the paper is silent, we chose:
  - the SFT recipe: `rejection` (the leader's own correct syntheses of a first sampling pass) or
    `file` (a user JSONL file, format in `read_sft_file`); `none` (the CPU default: SmolLM2 keeps
    too few of its syntheses for it to matter; docs/RESULTS.md) skips it;
  - the team answers are sampled once before training (`team_samples` per agent per task,
    `team_temperature`; 1 by default: a task drawn once, as in the main job, reads one answer per
    agent whatever is stored) and stored; each RL prompt draws one stored answer per agent (seeded), or
    none with probability `solo_fraction` (0.5: this trains the single-agent mode too, and with
    SmolLM2 it is where the skill grows first; docs/RESULTS.md);
  - G (`group_size`) is 6 (the main job; the recipes and the paper preset use 8), KL is off
    (`kl_coef=0`; the reference is the post-SFT leader), and the loss divides token sums by
    `rollout.max_new_tokens`;
  - `rounds=1` by default (CPU evaluation time); the leader and the single-agent baseline answer at
    `eval_temperature` (0: greedy), the team samples at `team_temperature` (seeded) in evaluation too.

Agents: one trainable `leader` policy (rollout workers + a ZeRO-3 learner group), K frozen team
agents `team0 .. team{K-1}` (`model=`, or per agent a conf/model preset or a saved model folder, e.g.
another run's checkpoint, in `algo.role_models`) and, for the untrained-leader baseline, a frozen
`untrained_leader` (`model=`). Frozen policies with the same base weights share one engine (the
cluster decides), so a homogeneous team and the untrained leader run on one.

Prompts (PROMPTS, overridable per key with `algo.prompts`; the env gives the question and the
answer instruction): the leader reads the task and the team's answers as "Solution i:" blocks
(`team_view=solutions`, the paper) or only their final answers, one "Agent i: <answer>" line each
(`team_view=answers`, template `leader_answers`);
a team agent revising in round t > 0 reads its previous answer and the leader's previous output.
The leader without team answers, the team in round 0 and the single-agent baseline use the env's
own single-agent prompt. Every reply ends at the env's answer stop strings.

prepare(tasks) — once per run; the result is persisted by the trainer (train_tasks.jsonl):
  1. every team agent answers every training task `team_samples` times (all K agents' requests
     dispatched at once); the answers are stored on the task (key `mlpo_team`) and, as one episode
     per task, in the trajectory buffer;
  2. tasks where >= `easy_threshold` of the team answers are already correct are dropped;
  3. the optional SFT warm-up of the leader.
collect(tasks, step) — per task, the leader's prompt holds the task and one draw of the stored
  team answers, or the task alone; G leader samples; reward = env reward of the leader.
update — A = R - mean over the G samples; clipped-ratio PG loss; only the leader trains.
evaluate(tasks) — the T-round protocol: round 0 the team answers alone, the leader synthesises;
  round t > 0 each team agent revises from the task, its previous answer and the leader's previous
  output, and the leader synthesises again; the answer is the leader's final answer. Reported with
  K+1 generations per round, and the baselines: leader alone, single agent (team0's model), team
  majority vote and the untrained leader (`untrained_leader`, the leader's base weights) with the
  same team; every accuracy with its 95% interval over the tasks, and the paired differences in
  COMPARISONS. Replies kept (algorithms/base.py "Replies"): the leaders' final answers
  (`acc/final`, `acc/untrained_final`), the leader alone and the single agent (`acc/leader_alone`,
  `acc/single`), the team answer the majority vote picked, with the K voted over (`acc/majority`),
  and every team agent's answers per round (`team_round<t>/<agent>`). Decoding labels
  (`eval_decoding`): the leaders' answers over the team name both decodings, e.g. "leader greedy;
  team temperature 0.3, seed 0".
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Optional

from algorithms.base import (Algorithm, PGConfig, TrainJob, correct_of, decoding_label, group_samples, reward_metrics,
                             train_epochs, vote)
from marl_llm.config import ConfigError, check, check_choice, check_entries, check_positive, check_range
from marl_llm.jsonl import read_jsonl
from marl_llm.losses import LossConfig
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec, generate_all
from marl_llm.registry import register_algorithm
from marl_llm.types import Completion, Episode, GenerationRequest, Sample, Turn

log = logging.getLogger(__name__)

LEADER = "leader"
UNTRAINED = "untrained_leader"  # frozen, the leader's base weights: the untrained-leader baseline
#: MLPO's own prompts, filled by `Algorithm.answer_prompt` ({question} and {answer_instruction}
#: come from the env); `algo.prompts` overrides single keys
PROMPTS: dict[str, str] = {
    # the leader over the team's answers ({team}: "Solution i:" blocks)
    "leader": ("{question}\n\nYour team proposed these solutions:\n\n{team}\n\n"
               "Check each solution for mistakes, decide which reasoning is right, and write the correct "
               "solution. {answer_instruction}"),
    # the leader over the team's final answers only (team_view=answers; {team}: "Agent i: <answer>" lines)
    "leader_answers": ("{question}\n\nYour team's final answers (some may be wrong):\n{team}\n\n"
                       "Solve the problem step by step. {answer_instruction}"),
    # a team agent in round t > 0: its previous answer and the leader's previous output
    "team_revise": ("{question}\n\nYour previous solution:\n{previous}\n\nThe team leader's analysis:\n{leader}\n\n"
                    "Use it to revise your solution. {answer_instruction}"),
}
TEAM_VIEWS = ("solutions", "answers")
TEAM_KEY = "mlpo_team"  # task field holding the stored team answers {"answers": [[str]], "correct": [[float]]}
SFT_MODES = ("none", "rejection", "file")
EVAL_BASELINES = ("single", "majority", "untrained")
# the leaders' answers over the team's (their decoding labels name the team's decoding too)
OVER_TEAM = ("acc/final", "acc/untrained_final")
# the paired differences every evaluation reports (those whose metrics it has): the trained leader
# + team against the untrained leader with the same team and against the team's majority vote,
# and the trained leader alone against the single agent (the base model)
COMPARISONS = (("acc/final", "acc/untrained_final"), ("acc/final", "acc/majority"),
               ("acc/leader_alone", "acc/single"))


@dataclass
class MLPOConfig(PGConfig):
    """MLPO settings. Optimiser settings (lr, betas, micro-batch) are `learner.*`; sampling
    temperature/top_p/max_new_tokens of the leader's RL samples are `rollout.*`; the optional
    format reward is the env's (`env.format_weight`, e.g. 0.1)."""

    name: str = "mlpo"
    # ---- team (frozen) --------------------------------------------------------------------------
    team_size: int = 3                      # K (paper 3)
    # team agent (team0 .. team{K-1}) -> conf/model preset (heterogeneous teams); absent or null: `model=`
    role_models: dict[str, Optional[str]] = field(default_factory=dict)
    team_samples: int = 1                   # stored answers per agent per training task (paper: several)
    team_temperature: float = 0.3           # team sampling, for the stored answers and in evaluation
    # ---- data preparation -----------------------------------------------------------------------
    max_train_tasks: Optional[int] = 56     # prepare at most this many training tasks (seeded pick); null: all
    easy_threshold: Optional[float] = 0.75  # drop tasks with >= this share of correct team answers; null: keep all
    # ---- SFT warm-up of the leader (the paper does not publish its recipe: rejection sampling) -
    sft_warmup: str = "none"                # none | rejection | file (conf/algo/mlpo.yaml says why none)
    sft_file: Optional[str] = None          # JSONL for sft_warmup=file (format: read_sft_file)
    sft_samples: int = 2                    # rejection: leader syntheses sampled per kept task
    sft_require_format: bool = False        # rejection: keep only correct AND well-formed syntheses
    sft_epochs: int = 1                     # passes over the SFT examples
    sft_batch_size: int = 16                # examples per optimiser step
    # ---- RL of the leader: GRPO with Dr. GRPO changes (PGConfig: group_size, std_normalize,
    # clip_eps, kl_coef, loss_agg = token sums / max_new_tokens)
    group_size: int = 6                     # G leader samples per prompt (paper: open)
    solo_fraction: float = 0.5              # share of RL prompts without team answers (single-agent mode)
    shuffle_team: bool = True               # shuffle the order of the drawn team answers in the prompt
    # what the leader reads of each team answer: the whole reply (the paper) or only the final
    # answer the env reads from it (a small model cannot read three long replies: conf/algo/mlpo.yaml)
    team_view: str = "answers"              # answers (the main job, cpu_mlpo_addition) | solutions (the paper)
    # ---- evaluation -----------------------------------------------------------------------------
    rounds: int = 1                         # T rounds of team + leader at inference (paper 5; 1 keeps CPU evals short)
    eval_temperature: float = 0.0           # leader and single-agent baseline (0: greedy; the team: team_temperature)
    eval_leader_alone: bool = True
    eval_baselines: list[str] = field(default_factory=lambda: list(EVAL_BASELINES))
    # ---- prompts ------------------------------------------------------------------------------
    prompts: dict[str, str] = field(default_factory=dict)  # template overrides by key of PROMPTS (leader, team_revise)

    def __post_init__(self):
        super().__post_init__()
        check_positive("algo.team_size", self.team_size)
        for key in ("team_samples", "sft_samples", "sft_epochs", "sft_batch_size", "rounds"):
            check_positive(f"algo.{key}", getattr(self, key))
        if self.max_train_tasks is not None:
            check_positive("algo.max_train_tasks", self.max_train_tasks, note="or null (all tasks)")
        if self.easy_threshold is not None:
            check_range("algo.easy_threshold", self.easy_threshold, 0, 1, lo_open=True, note="or null (no filtering)")
        check_range("algo.solo_fraction", self.solo_fraction, 0, 1)
        for key in ("team_temperature", "eval_temperature"):
            check_positive(f"algo.{key}", getattr(self, key), allow_zero=True)
        check_choice("algo.sft_warmup", self.sft_warmup, SFT_MODES)
        check_choice("algo.team_view", self.team_view, TEAM_VIEWS)
        if self.sft_warmup == "file":
            check(bool(self.sft_file), "algo.sft_file", self.sft_file,
                  "is missing: algo.sft_warmup=file needs algo.sft_file=<path to a JSONL file>")
        else:
            check(not self.sft_file, "algo.sft_file", self.sft_file,
                  f"is set but algo.sft_warmup={self.sft_warmup!r}; use algo.sft_warmup=file to train on it")
        check_entries("algo.eval_baselines", self.eval_baselines, EVAL_BASELINES)
        check_entries("algo.prompts", list(self.prompts), list(PROMPTS))


# ---- pure helpers (unit-tested without engines) ---------------------------------------------------
def read_sft_file(path: str) -> list[dict[str, Any]]:
    """A user SFT file for the leader: JSONL, one example per line, each with

      completion    (str, required) the leader's target reply (e.g. evaluates the team's answers,
                    backtracks, ends with <answer>...</answer>);
    and exactly one prompt form:
      task          (object) an env task (e.g. {"question": ..., "answer": ...}) and optionally
                    team_answers (list of str): the prompt is MLPO's leader prompt;
      messages      (list of {"role", "content"}) the full chat prompt;
      prompt        (str) a single user message (no system prompt is added).
    """
    forms = ("task", "messages", "prompt")
    usage = ("each line needs 'completion' (str) and exactly one of 'task' (+ optional 'team_answers'), "
             "'messages' or 'prompt'")
    out = read_jsonl(path, "algo.sft_file")
    for n, ex in enumerate(out, 1):
        where = f"algo.sft_file {path}, example {n}"
        if not isinstance(ex.get("completion"), str) or not ex["completion"].strip():
            raise ConfigError(f"{where}: missing or empty 'completion'; {usage}")
        given = [f for f in forms if f in ex]
        if len(given) != 1:
            raise ConfigError(f"{where}: has prompt fields {given}; {usage}")
        form = given[0]
        if form == "task" and not isinstance(ex["task"], dict):
            raise ConfigError(f"{where}: 'task' must be an object; {usage}")
        if "team_answers" in ex and (form != "task" or not isinstance(ex["team_answers"], list)
                                     or not all(isinstance(t, str) for t in ex["team_answers"])):
            raise ConfigError(f"{where}: 'team_answers' must be a list of str and goes with 'task'; {usage}")
        if form == "messages" and not (isinstance(ex["messages"], list) and ex["messages"] and all(
                isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                for m in ex["messages"])):
            raise ConfigError(f"{where}: 'messages' must be a non-empty list of {{'role': str, 'content': str}}")
        if form == "prompt" and not isinstance(ex["prompt"], str):
            raise ConfigError(f"{where}: 'prompt' must be a string; {usage}")
    if not out:
        raise ConfigError(f"algo.sft_file={path!r} holds no examples; {usage}")
    return out


def is_easy(correct: list[list[float]], threshold: Optional[float]) -> bool:
    """Too easy to train on: the share of correct team answers (all agents, all samples) >= threshold."""
    flat = [c for agent in correct for c in agent]
    return threshold is not None and bool(flat) and sum(flat) / len(flat) >= threshold


def draw_team(n_samples: list[int], rng: random.Random, solo_fraction: float,
              shuffle: bool) -> Optional[list[tuple[int, int]]]:
    """One draw of the stored team answers: (agent, sample) per agent, or None (a solo prompt)."""
    if rng.random() < solo_fraction:
        return None
    picks = [(k, rng.randrange(n)) for k, n in enumerate(n_samples)]
    if shuffle:
        rng.shuffle(picks)
    return picks


def _strip(task: dict[str, Any]) -> dict[str, Any]:
    """The task without MLPO's stored team answers (episodes would repeat them G times)."""
    return {k: v for k, v in task.items() if k != TEAM_KEY}


@dataclass
class Round:
    """One round of the inference protocol for one leader variant."""

    team: list[list[Completion]]                   # [agent][task]: the team's answers of this round
    leader: list[Completion]                       # [task]: the leader's synthesis of them
    team_requests: list[list[GenerationRequest]]   # [agent][task]: the prompts of `team`
    leader_requests: list[GenerationRequest]       # [task]: the prompts of `leader`

    def answers(self, i: int) -> list[str]:
        """The K team answers to task i."""
        return [agent[i].text for agent in self.team]


# ---- the algorithm -------------------------------------------------------------------------------
@register_algorithm("mlpo")
class MLPO(Algorithm):
    Config = MLPOConfig
    headline = ("acc/final", "acc/leader_alone")
    # the prompts are MLPO's own (PROMPTS) on an answer env's question, instruction and chat messages
    env_hooks = ("question_text", "instruction", "messages", "extract_answer")

    def __init__(self, cfg, env, run):
        super().__init__(cfg, env, run)
        self.team = [f"team{k}" for k in range(cfg.team_size)]
        self.stats: dict[str, float] = {}     # prepare/SFT statistics, kept in the checkpoint
        self._report: dict[str, float] = {}   # merged into the next update's metrics once

    # ---- policies and validation -----------------------------------------------------------------
    def policy_specs(self):
        specs = [PolicySpec(LEADER, self.run.model, trainable=True, reference=self.cfg.kl_coef > 0)]
        specs += [PolicySpec(agent, self.role_model(agent), trainable=False) for agent in self.team]
        if "untrained" in self.cfg.eval_baselines:
            specs.append(PolicySpec(UNTRAINED, self.run.model, trainable=False))
        return specs

    def roles(self) -> tuple[str, ...]:
        """`algo.role_models` maps team agents to models (the leader is `model=`)."""
        return tuple(self.team)

    def required_roles(self) -> tuple[str, ...]:
        return ("single",)  # the leader alone, round 0 of the team and the single-agent baseline

    def validate(self) -> None:
        super().validate()
        if self.cfg.sft_warmup == "file":
            read_sft_file(self.cfg.sft_file)  # a bad file fails now, before any engine starts

    # ---- prompts ---------------------------------------------------------------------------------
    def template(self, key: str) -> str:
        return self.cfg.prompts.get(key) or PROMPTS[key]

    def leader_prompt(self, task, team_answers: Optional[list[str]] = None) -> list[dict[str, str]]:
        """The leader over the team's answers ("Solution i:" blocks; with team_view=answers, one
        "Agent i: <final answer>" line each, read as the majority vote reads it); without any, the env's
        single-agent prompt (the leader alone)."""
        team = [t for t in (team_answers or []) if t is not None]
        if not team:
            return self.env.prompt(task, "single")
        if self.cfg.team_view == "answers":
            finals = [self.env.extract_answer(str(t)) for t in team]  # the majority vote's reading
            team = [a if a is not None else "(no final answer)" for a in finals]

            def build(team_answers):
                block = "\n".join(f"Agent {i + 1}: {a}" for i, a in enumerate(team_answers))
                return self.answer_messages(self.template("leader_answers"), task, team=block)
        else:
            def build(team_answers):
                block = "\n\n".join(f"Solution {i + 1}:\n{str(t).strip()}" for i, t in enumerate(team_answers))
                return self.answer_messages(self.template("leader"), task, team=block)
        # answers too long for the model are cut one by one, the longest first
        return self.env.fit_context(build, task, "leader", {"team_answers": team})

    def team_prompt(self, task, previous: Optional[str] = None, leader: Optional[str] = None) -> list[dict[str, str]]:
        """A team agent: in round 0 (no context) the env's single-agent prompt; in round t > 0 it
        revises its previous answer after reading the leader's previous output."""
        if not (previous or leader):
            return self.env.prompt(task, "single")
        return self.answer_prompt(self.template("team_revise"), task, previous=previous or "(none)",
                                  leader=leader or "(none)")

    def team_generate(self, reqs_per_agent: list[list[GenerationRequest]]) -> list[list[list[Completion]]]:
        """All team agents' requests at once, in agent order (agents on one engine go out as one
        batch); the results per agent."""
        out = generate_all({agent: (self.policies[agent], reqs)
                            for agent, reqs in zip(self.team, reqs_per_agent)}).result()
        return [out[agent] for agent in self.team]

    def _correct(self, task, role: str, text: str) -> float:
        return correct_of(self.env.reward(task, {role: text}), self.env.max_reward)

    # ---- prepare: team answers once, easy-task filter, SFT warm-up -------------------------------
    def prepare(self, tasks):
        tasks = [dict(t) for t in tasks]
        n_env = len(tasks)
        if self.cfg.max_train_tasks is not None and n_env > self.cfg.max_train_tasks:
            pick = sorted(random.Random(self.seed("pick_tasks")).sample(range(n_env), self.cfg.max_train_tasks))
            tasks = [tasks[i] for i in pick]
        with self.timer("team_answers"):
            self.store_team_answers(tasks)
        kept = [t for t in tasks if not is_easy(t[TEAM_KEY]["correct"], self.cfg.easy_threshold)]
        dropped = len(tasks) - len(kept)
        team_acc = mean(c for t in tasks for a in t[TEAM_KEY]["correct"] for c in a)
        kept_how = ("kept every task (algo.easy_threshold=null)" if self.cfg.easy_threshold is None else
                    f"dropped {dropped} task(s) as too easy (>= {self.cfg.easy_threshold} of team answers "
                    f"correct), kept {len(kept)}")
        log.info("MLPO prepare: %d training tasks (of the env's %d); %d team answers per task, %.1f%% correct; %s",
                 len(tasks), n_env, self.cfg.team_size * self.cfg.team_samples, 100 * team_acc, kept_how)
        if not kept:
            raise RuntimeError(f"MLPO: all {len(tasks)} training tasks were dropped as too easy (>= "
                               f"{self.cfg.easy_threshold} of team answers correct); raise algo.easy_threshold, "
                               "set it to null, or use harder tasks")
        self.stats.update({"prepare/tasks": float(len(tasks)), "prepare/dropped_easy": float(dropped),
                           "prepare/kept": float(len(kept)), "prepare/team_acc": team_acc})
        if self.cfg.sft_warmup != "none":
            with self.timer("sft"):
                self.stats.update(self.sft_warmup(kept))
        self._report = dict(self.stats)
        return kept

    def store_team_answers(self, tasks: list[dict[str, Any]]) -> None:
        """Every team agent answers every task `team_samples` times: one batched request list per
        agent, all agents dispatched at once. Answers go on the task and into the buffer."""
        K, S = self.cfg.team_size, self.cfg.team_samples
        todo = [i for i, t in enumerate(tasks)
                if not (isinstance(t.get(TEAM_KEY), dict) and len(t[TEAM_KEY].get("answers", [])) == K)]
        if len(todo) < len(tasks):
            log.info("MLPO prepare: %d task(s) already carry %d agents' team answers; reusing them",
                     len(tasks) - len(todo), K)
        outs: list[list[list[Completion]]] = [[] for _ in range(K)]
        if todo:
            outs = self.team_generate([self.requests("team", [tasks[i] for i in todo], S, self.cfg.team_temperature,
                                                     seed=("team", k), prompt=self.team_prompt) for k in range(K)])
        episodes = []
        for j, i in enumerate(todo):
            task = tasks[i]
            comps = [outs[k][j] for k in range(K)]
            correct = [[self._correct(task, "team", c.text) for c in comps[k]] for k in range(K)]
            task[TEAM_KEY] = {"answers": [[c.text for c in comps[k]] for k in range(K)], "correct": correct}
            turns = [Turn.from_completion(c, agent=self.team[k], policy=self.team[k], reward=correct[k][s],
                                          meta={"sample": s})
                     for k in range(K) for s, c in enumerate(comps[k])]
            share = mean(x for a in correct for x in a)
            episodes.append(Episode(task=_strip(task), turns=turns, reward=share, components={"team_correct": share},
                                    group=f"{task['id']}/team", step=0,
                                    meta={"phase": "team_answers",
                                          "easy": is_easy(correct, self.cfg.easy_threshold)}))
        for i in set(range(len(tasks))) - set(todo):  # reused answers: (re)score them with this env
            t = tasks[i]
            t[TEAM_KEY]["correct"] = [[self._correct(t, "team", a) for a in agent] for agent in t[TEAM_KEY]["answers"]]
        if episodes and self.buffer is not None:
            self.buffer.add(episodes)

    def leader_context(self, task, draw: Optional[list[tuple[int, int]]]) -> dict[str, Any]:
        """The leader's prompt context for one draw: the drawn team answers, or none (solo)."""
        if draw is None:
            return {}
        answers = task[TEAM_KEY]["answers"]
        return {"team_answers": [answers[k][s] for k, s in draw]}

    def draw(self, task, step: int, index: int) -> Optional[list[tuple[int, int]]]:
        if not isinstance(task.get(TEAM_KEY), dict):
            raise RuntimeError(f"MLPO: training task {task.get('id')!r} has no stored team answers "
                               f"({TEAM_KEY!r}); were the tasks prepared by algo=mlpo?")
        rng = random.Random(self.seed("draw", step, index, task.get("id")))
        return draw_team([len(a) for a in task[TEAM_KEY]["answers"]], rng, self.cfg.solo_fraction,
                         self.cfg.shuffle_team)

    def sft_warmup(self, tasks: list[dict[str, Any]]) -> dict[str, float]:
        leader = self.policies[LEADER]
        if self.cfg.sft_warmup == "rejection":
            samples, stats = self.rejection_samples(tasks)
        else:
            samples = self.file_samples(read_sft_file(self.cfg.sft_file))
            stats = {"sft/examples": float(len(samples))}
        if not samples:
            log.warning("MLPO SFT warm-up (%s): no examples kept; skipping it", self.cfg.sft_warmup)
            return stats
        job = TrainJob(leader, samples, self.cfg.sft_epochs, self.cfg.sft_batch_size,
                       LossConfig(kind="sft", agg="token_mean"), random.Random(self.seed("sft_order")))
        losses = [m.get("loss", float("nan")) for epoch in train_epochs({LEADER: job})[LEADER] for m in epoch]
        leader.sync_weights()  # the first RL collect samples from the warmed-up leader
        if self.cfg.kl_coef > 0:
            leader.snapshot_reference()  # KL is measured against the warmed-up leader
        stats.update({"sft/steps": float(len(losses)), "sft/loss_first": losses[0], "sft/loss_last": losses[-1]})
        log.info("MLPO SFT warm-up (%s): %d examples, %d optimiser steps, loss %.4f -> %.4f",
                 self.cfg.sft_warmup, len(samples), len(losses), losses[0], losses[-1])
        return stats

    def rejection_samples(self, tasks) -> tuple[list[Sample], dict[str, float]]:
        """The leader's own correct syntheses (prompts drawn as in RL, `sft_samples` per task)."""
        draws = [self.draw(t, -1, i) for i, t in enumerate(tasks)]
        outs = self.policies[LEADER].generate(self.requests(
            LEADER, tasks, self.cfg.sft_samples, seed=("sft",),
            contexts=[self.leader_context(t, d) for t, d in zip(tasks, draws)], prompt=self.leader_prompt))
        seen, samples, n = set(), [], 0
        for task, comps in zip(tasks, outs):
            for c in comps:
                n += 1
                r = self.env.reward(task, {LEADER: c.text})
                ok = correct_of(r, self.env.max_reward) >= 1.0
                if self.cfg.sft_require_format:
                    ok = ok and r.components.get("format", 1.0) >= 1.0
                key = (tuple(c.prompt_ids), tuple(c.completion_ids))
                if ok and c.completion_ids and key not in seen:
                    seen.add(key)
                    samples.append(Sample(list(c.prompt_ids), list(c.completion_ids)))
        log.info("MLPO rejection sampling: kept %d of %d leader syntheses", len(samples), n)
        return samples, {"sft/sampled": float(n), "sft/examples": float(len(samples)),
                         "sft/keep_rate": len(samples) / n if n else 0.0}

    def file_samples(self, examples: list[dict[str, Any]]) -> list[Sample]:
        """The SFT file's examples as leader samples, tokenized as the leader's engine templates chats."""
        samples = []
        for ex in examples:
            if "task" in ex:
                msgs = self.leader_prompt(ex["task"], team_answers=ex.get("team_answers"))
            elif "messages" in ex:
                msgs = ex["messages"]
            else:
                msgs = [{"role": "user", "content": ex["prompt"]}]
            prompt_ids, completion_ids = self.policies[LEADER].tokenize(msgs, ex["completion"])
            samples.append(Sample(list(prompt_ids), list(completion_ids)))
        return samples

    # ---- collect: G leader samples over a draw of the stored team answers -----------------------
    def collect(self, tasks, step):
        draws = [self.draw(t, step, i) for i, t in enumerate(tasks)]
        reqs = self.requests(LEADER, tasks, self.cfg.group_size, seed=("collect", step),
                             contexts=[self.leader_context(t, d) for t, d in zip(tasks, draws)],
                             prompt=self.leader_prompt)
        with self.timer("generate"):
            groups = self.policies[LEADER].generate(reqs)
        episodes = []
        with self.timer("reward"):
            items = [(t, {LEADER: c.text}) for t, comps in zip(tasks, groups) for c in comps]
            rewards = iter(self.env.reward_batch(items))
            for i, (task, draw, comps) in enumerate(zip(tasks, draws, groups)):
                team_correct = (None if draw is None else
                                mean(task[TEAM_KEY]["correct"][k][s] for k, s in draw))
                for c in comps:
                    r = next(rewards)
                    turn = Turn.from_completion(c, agent=LEADER, policy=LEADER, reward=r.total)
                    episodes.append(Episode(task=_strip(task), turns=[turn], reward=r.total, components=r.components,
                                            group=f"{task['id']}/{step}/{i}", step=step,
                                            meta={"solo": draw is None, "draw": draw, "team_correct": team_correct}))
        return episodes

    # ---- update: Dr. GRPO on the leader only -----------------------------------------------------
    def credit(self, episodes: list[Episode]) -> list[Sample]:
        """A = R - mean over the episode's group (Dr. GRPO: no std division by default)."""
        return group_samples(episodes, std_normalize=self.cfg.std_normalize)

    def update(self, episodes, step):
        samples = self.credit(episodes)
        with self.timer("train"):
            train_metrics = self.policies[LEADER].train(samples, self.loss)
        team = [e for e in episodes if not e.meta.get("solo")]
        solo = [e for e in episodes if e.meta.get("solo")]
        metrics: dict[str, Any] = reward_metrics(episodes)
        if team:
            metrics["reward/with_team"] = mean(e.reward for e in team)
            metrics["team/drawn_correct"] = mean(e.meta["team_correct"] for e in team)
            wrong = [e for e in team if e.meta["team_correct"] == 0]
            if wrong:
                metrics["reward/team_all_wrong"] = mean(e.reward for e in wrong)
        if solo:
            metrics["reward/solo"] = mean(e.reward for e in solo)
        metrics.update(train_metrics)
        metrics.update(self._report)  # prepare/SFT statistics, once (on the first step)
        self._report = {}
        return metrics

    # ---- evaluate: T rounds of team + leader, and the baselines ----------------------------------
    def run_rounds(self, tasks, leaders: dict[str, str]) -> dict[str, list[Round]]:
        """The inference protocol for several leader variants (variant -> leader policy) in lockstep.

        Round 0: each team agent answers alone (shared by all variants); round t > 0: each agent
        revises from its previous answer and that variant's previous leader output. After the team,
        each variant's leader synthesises the round's K answers. Every round dispatches all team
        requests at once (one batch per team engine), then all leaders at once. Seeds depend on
        (round, agent, task) only, so every evaluation draws the same samples.
        Returns variant -> the T rounds.
        """
        n, variants = len(tasks), list(leaders)
        traces: dict[str, list[Round]] = {v: [] for v in variants}
        for t in range(self.cfg.rounds):
            askers = variants[:1] if t == 0 else variants  # round 0 is asked once and shared

            def context(v, k):  # agent k's prompt context per task, for variant v (round 0: none)
                if t == 0:
                    return None
                prev = traces[v][-1]
                return [{"previous": a.text, "leader": lead.text} for a, lead in zip(prev.team[k], prev.leader)]

            team_reqs = [[r for v in askers for r in self.requests(
                "team", tasks, 1, self.cfg.team_temperature, seed=("eval", t, k), contexts=context(v, k),
                prompt=self.team_prompt)] for k in range(len(self.team))]
            results = self.team_generate(team_reqs)
            # results[k] (and team_reqs[k]): agent k's answers for each asker in turn (n each)
            asker = {v: j for j, v in enumerate(askers)}
            j_of = {v: asker[v if t else askers[0]] for v in variants}
            team = {v: [[c[0] for c in res[j_of[v] * n:(j_of[v] + 1) * n]] for res in results] for v in variants}
            leader_reqs = {v: self.requests(
                LEADER, tasks, 1, self.cfg.eval_temperature, seed=("eval", t, LEADER),
                contexts=[{"team_answers": [agent[i].text for agent in team[v]]} for i in range(n)],
                prompt=self.leader_prompt) for v in variants}
            pending = {v: self.policies[leaders[v]].generate_async(leader_reqs[v]) for v in variants}
            for v, p in pending.items():
                traces[v].append(Round(team=team[v], leader=[c[0] for c in p.result()],
                                       team_requests=[r[j_of[v] * n:(j_of[v] + 1) * n] for r in team_reqs],
                                       leader_requests=leader_reqs[v]))
        return traces

    def evaluate(self, tasks):
        if not tasks:
            return {}
        K, n = self.cfg.team_size, len(tasks)
        leaders = {"": LEADER}
        if "untrained" in self.cfg.eval_baselines:
            leaders["untrained_"] = UNTRAINED

        def alone(role, prompt=None):
            return self.requests(role, tasks, 1, self.cfg.eval_temperature, seed=("eval", role), prompt=prompt)

        # one-generation baselines go out first; they run while the team answers round 0
        pending = {}
        if self.cfg.eval_leader_alone:
            reqs = alone(LEADER, self.leader_prompt)
            pending["leader_alone"] = (LEADER, reqs, self.policies[LEADER].generate_async(reqs))
        if "single" in self.cfg.eval_baselines:  # the env's single agent on team0's model
            reqs = alone("single")
            pending["single"] = ("single", reqs, self.policies[self.team[0]].generate_async(reqs))
        traces = self.run_rounds(tasks, leaders)
        outcomes: dict[str, list[float]] = {}  # metric -> one outcome per task
        costs: dict[str, float] = {}

        def correct(role: str, comps) -> list[float]:
            return [self._correct(t, role, c.text) for t, c in zip(tasks, comps)]

        for prefix, rounds in traces.items():
            gens = tokens = 0
            for t, rd in enumerate(rounds):
                gens += K + 1
                tokens += sum(len(c.completion_ids) for c in [*rd.leader, *(c for agent in rd.team for c in agent)])
                outcomes[f"acc/{prefix}round{t}"] = correct(LEADER, rd.leader)
                if not prefix:  # per task: the share of team agents that are right
                    agents = [correct("team", a) for a in rd.team]
                    outcomes[f"acc/team_round{t}"] = [mean(c) for c in zip(*agents)]
                    for agent, reqs, comps, scores in zip(self.team, rd.team_requests, rd.team, agents):
                        self.keep_replies(f"team_round{t}/{agent}", tasks, {"team": (reqs, [c.text for c in comps])},
                                          scores, "correct")
                    costs[f"gens/round{t}"] = float(gens)
                    costs[f"tokens/round{t}"] = tokens / n
            name = f"acc/{prefix}final"
            outcomes[name] = outcomes[f"acc/{prefix}round{len(rounds) - 1}"]
            last = rounds[-1]
            self.keep_replies(name, tasks, {LEADER: (last.leader_requests, [c.text for c in last.leader])},
                              outcomes[name], "correct")
        final = traces[""][-1].leader
        outcomes["reward"] = [self.env.reward(t, {LEADER: c.text}).total for t, c in zip(tasks, final)]
        # does the leader stay right when no team answer of round 0 is?
        r0 = traces[""][0]
        wrong = [not any(self._correct(t, "team", a) for a in r0.answers(i)) for i, t in enumerate(tasks)]
        outcomes["frac/team_round0_all_wrong"] = [float(w) for w in wrong]
        if any(wrong):
            outcomes["acc/final_when_team_all_wrong"] = [c for c, w in zip(outcomes["acc/final"], wrong) if w]
        if "majority" in self.cfg.eval_baselines:
            picks = [(t, r0.answers(i), vote(self.env, r0.answers(i))) for i, t in enumerate(tasks)]
            outcomes["acc/majority"] = [0.0 if v is None else self._correct(t, "team", answers[v])
                                        for t, answers, v in picks]
            # the kept reply: the answer the vote picked (no vote: the first agent's, which has no answer)
            k_of = [v or 0 for _, _, v in picks]
            self.keep_replies("acc/majority", tasks, {"team": ([r0.team_requests[k][i] for i, k in enumerate(k_of)],
                                                               [r0.answers(i)[k] for i, k in enumerate(k_of)])},
                              outcomes["acc/majority"], "correct", candidates=[answers for _, answers, _ in picks])
            costs["gens/majority"] = float(K)
            costs["tokens/majority"] = sum(len(c.completion_ids) for agent in r0.team for c in agent) / n
        for key, (role, reqs, result) in pending.items():
            comps = [c[0] for c in result.result()]
            outcomes[f"acc/{key}"] = correct(role, comps)
            self.keep_replies(f"acc/{key}", tasks, {role: (reqs, [c.text for c in comps])}, outcomes[f"acc/{key}"],
                              "correct")
            costs[f"gens/{key}"] = 1.0
            costs[f"tokens/{key}"] = sum(len(c.completion_ids) for c in comps) / n
        return {**self.eval_metrics(outcomes), **costs}

    def eval_decoding(self) -> dict[str, str]:
        """`Algorithm.eval_decoding`; the leaders' answers over the team's (OVER_TEAM) also name
        the team's decoding: "leader greedy; team temperature 0.3, seed 0"."""
        team = decoding_label([self.cfg.team_temperature], self.run.seed)
        return {name: f"leader {label}; team {team}" if name in OVER_TEAM else label
                for name, label in super().eval_decoding().items()}

    def comparisons(self) -> list[tuple[str, str]]:
        return list(COMPARISONS)

    # ---- state ------------------------------------------------------------------------------------
    def state_dict(self):
        return {"stats": dict(self.stats)}

    def load_state_dict(self, state):
        self.stats = dict(state.get("stats", {}))
