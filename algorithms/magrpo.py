"""MAGRPO: N agents, each its own policy and optimiser, trained on one joint reward.

What the paper (MAGRPO: LLM collaboration trained with multi-agent GRPO) specifies: every agent
samples G responses; their joint actions are scored by one joint reward (the writing and coding
rewards live in the envs); the advantage is the reward minus the group mean, shared by all
agents; each agent's loss is -(1/G) sum_g A_g * log pi_i(response | prompt), on-policy (no ratio
clip, no KL); multi-turn training feeds external feedback back to the agents. What we chose and
made configurable: `aligned` joint actions by default (`cross`: the Cartesian product, where a
response gets the mean advantage of its joint actions), the advantage clamp (`adv_clamp`),
per-turn sample weights (`turn_weights`), the best joint action of a turn as every agent's
context for the next, early stop at the env's maximum, and the evaluation baselines below.

Protocol (per task, per turn): every agent samples G responses to its own prompt; joint actions
pair them (`aligned`: the g-th of every agent, G joint actions; `cross`: the Cartesian product,
G^N); the env scores each joint action with one joint reward.
Credit: A = R - mean over the group (optionally / std), the same for every agent, clamped.
In `cross` mode a response takes part in several joint actions and gets the mean of their
advantages (its marginal contribution).
Loss per agent: -(1/G) sum_g A_g * log pi_i(response | prompt), log pi = sum of token log-probs
(`loss_agg=token_sum`, no ratio clip, no KL by default).
Multi-turn: the best joint action of turn t, with feedback from the env's transition (or an
expert policy of the run), forms every agent's context for turn t+1; turn t's samples are
weighted by `turn_weights[t]`; a task stops early once a turn's mean reward reaches the env's max.
Evaluation: each trained agent answers once (greedy), the env combines the outputs; baselines on
the untrained weights (one frozen `base-<agent>` policy per agent, rollout workers only; the engine
runs those with the same base weights on one engine): one model doing the whole task (`single`),
naive concatenation of the agents' parallel answers (`naive`), a sequential pipeline where each
agent sees the earlier agents' outputs (`sequential`), and one round of discussion where each
agent revises after reading the others' first answers (`discussion`).
Every score comes with its 95% interval over the tasks, and the trained pair's reward is compared
with each baseline's by the paired difference `diff/reward-<baseline>/reward` (`comparisons`).
Each method's final outputs are kept as one joint reply per task under `reward` and
`<baseline>/reward` (every agent's prompt and reply; the score is the joint reward: algorithms/base.py
"Replies").
Each agent's model: `algo.role_models.<agent>` (a conf/model preset or a saved model folder), else
`model=`. The agents' learner groups train one after the other or at the same time as the engine decides
(`learner.concurrent`).
"""
from __future__ import annotations

import itertools
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Any, Optional

from algorithms.base import Algorithm, PGConfig, group_episodes, reward_metrics, score_outcomes
from envs.base import Reward
from marl_llm.advantages import group_advantages
from marl_llm.config import ConfigError, check, check_choice, check_entries, check_min, check_positive
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Completion, Episode, GenerationRequest, Sample, Turn

log = logging.getLogger(__name__)
#: one generation stage of an evaluated method: role -> (its requests, its completions), one per task
Stage = dict[str, tuple[list[GenerationRequest], list[Completion]]]
EVAL_BASELINES = ("single", "naive", "sequential", "discussion")
DISCUSSION_FEEDBACK = ("Your teammates answered:\n{others}\n\n"
                       "Revise your own part so that it fits with theirs without repeating them.")
EXPERT_PROMPT = ("Task:\n{task}\n\nThe collaborators answered:\n{outputs}\n\n"
                 "Give each collaborator one or two sentences of concrete feedback to improve.")


def base(agent: str) -> str:
    """The frozen policy holding `agent`'s untrained weights (the evaluation baselines')."""
    return f"base-{agent}"


@dataclass
class MAGRPOConfig(PGConfig):
    name: str = "magrpo"
    agents: list[str] = field(default_factory=lambda: ["agent1", "agent2"])
    # agent -> model preset name (conf/model/<name>.yaml); an agent not listed uses `model=`
    role_models: dict[str, Optional[str]] = field(default_factory=dict)
    joint: str = "aligned"
    adv_clamp: float = 10.0
    clip_eps: Optional[float] = None
    loss_agg: str = "token_sum"  # -(1/G) sum_g A_g log pi: summed token log-probs
    turns: int = 1
    turn_weights: list[float] = field(default_factory=lambda: [1.2, 0.8])
    # "env": the env's transition (e.g. unit-test diagnostics); "policy:<agent>": that agent's
    # policy writes the feedback as an expert
    feedback: str = "env"
    early_stop: bool = True
    # baselines scored next to the trained agents at every evaluation (see the module docstring);
    # each adds frozen `base-<agent>` policies (rollout workers only)
    eval_baselines: list[str] = field(default_factory=lambda: list(EVAL_BASELINES))

    def __post_init__(self):
        super().__post_init__()
        check_choice("algo.joint", self.joint, ("aligned", "cross"))
        check(len(self.agents) >= 1 and len(set(self.agents)) == len(self.agents), "algo.agents", self.agents,
              "must be distinct, non-empty role names")
        check_positive("algo.adv_clamp", self.adv_clamp)
        check_min("algo.turns", self.turns, 1)
        check(len(self.turn_weights) >= self.turns, "algo.turn_weights", self.turn_weights,
              f"needs one weight per turn (algo.turns={self.turns})")
        check(self.feedback == "env" or (self.feedback.startswith("policy:")
                                         and self.feedback.split(":", 1)[1] in self.agents),
              "algo.feedback", self.feedback,
              f"is not allowed; use 'env' or 'policy:<agent>' with an agent of {self.agents}")
        check_entries("algo.eval_baselines", self.eval_baselines, EVAL_BASELINES)


@register_algorithm("magrpo")
class MAGRPO(Algorithm):
    Config = MAGRPOConfig

    def roles(self):
        return tuple(self.cfg.agents)

    def required_roles(self):
        return (*self.cfg.agents, *(["single"] if "single" in self.cfg.eval_baselines else []))

    def validate(self):
        if "single" in self.cfg.eval_baselines and "single" not in self.env.roles:
            raise ConfigError(f"algo.eval_baselines has 'single' but env {self.run.env.name!r} has no 'single' "
                              f"role (its roles: {list(self.env.roles)}); drop it from algo.eval_baselines")
        super().validate()

    def policy_specs(self):
        specs = [PolicySpec(a, self.role_model(a), trainable=True, reference=self.cfg.kl_coef > 0)
                 for a in self.cfg.agents]
        if self.cfg.eval_baselines:
            specs += [PolicySpec(base(a), self.role_model(a), trainable=False) for a in self.cfg.agents]
        return specs

    def comparisons(self):
        return [("reward", f"{name}/reward") for name in self.cfg.eval_baselines]

    @property
    def max_reward(self) -> float:
        """The joint reward's maximum for these agents (coding: 4.0 for a pair, 1.0 alone)."""
        return self.env.max_reward_for(self.cfg.agents)

    def _joint_actions(self) -> list[tuple[int, ...]]:
        G, N = self.cfg.group_size, len(self.cfg.agents)
        if self.cfg.joint == "aligned":
            return [(g,) * N for g in range(G)]
        return list(itertools.product(range(G), repeat=N))

    def _generate(self, tasks, contexts, step: int, turn: int):
        """All agents' requests of one turn dispatched at once; returns agent -> per-task samples."""
        # seeds differ per agent: agents sharing a base model must not sample identical responses
        pending = {a: self.policies[a].generate_async(
            self.requests(a, tasks, self.cfg.group_size, seed=("collect", step, turn, a),
                          contexts=[ctx.get(a, {}) for ctx in contexts])) for a in self.cfg.agents}
        return {a: p.result() for a, p in pending.items()}

    def _feedback(self, task, outputs: dict[str, str], reward: Reward) -> dict[str, str]:
        if self.cfg.feedback == "env":
            return self.env.transition(task, outputs, reward) or {}
        expert = self.policies[self.cfg.feedback.split(":", 1)[1]]
        question = self.env.prompt(task, self.cfg.agents[0])[-1]["content"]
        listing = "\n\n".join(f"[{a}]\n{o}" for a, o in outputs.items())
        msg = [{"role": "user", "content": EXPERT_PROMPT.format(task=question, outputs=listing)}]
        text = expert.generate([GenerationRequest(messages=msg, sampling=self.sampling(1, temperature=0.0))])[0][0].text
        return {a: text for a in outputs}

    def collect(self, tasks, step):
        episodes: list[Episode] = []
        contexts: list[dict[str, dict[str, Any]]] = [{} for _ in tasks]
        active = list(range(len(tasks)))
        for turn in range(self.cfg.turns):
            if not active:
                break
            with self.timer("generate"):
                outs = self._generate([tasks[i] for i in active], [contexts[i] for i in active], step, turn)
            still = []
            for k, ti in enumerate(active):
                task = tasks[ti]
                turns = {a: [Turn.from_completion(c, agent=a, policy=a, round=turn) for c in outs[a][k]]
                         for a in self.cfg.agents}
                joint = self._joint_actions()
                members = [[turns[a][g] for a, g in zip(self.cfg.agents, ja)] for ja in joint]
                with self.timer("reward"):  # one batch: coding envs run the sandbox in parallel
                    rewards = self.env.reward_batch([(task, {t.agent: t.text for t in m}) for m in members])
                group = [Episode(task=task, turns=m, reward=r.total, components=r.components,
                                 group=f"{task['id']}/t{turn}", step=step, meta={"turn": turn, "joint": list(ja)})
                         for ja, m, r in zip(joint, members, rewards)]
                episodes.extend(group)
                if self.cfg.early_stop and mean(e.reward for e in group) >= self.max_reward - 1e-9:
                    continue
                if turn + 1 < self.cfg.turns:
                    b = max(range(len(group)), key=lambda j: group[j].reward)
                    best = group[b]
                    best_out = {t.agent: t.text for t in best.turns}
                    with self.timer("feedback"):
                        fb = self._feedback(task, best_out, rewards[b])
                    contexts[ti] = {a: {"previous": best_out[a], "feedback": fb.get(a, "")}
                                    for a in self.cfg.agents}
                    still.append(ti)
            active = still
        return episodes

    def credit(self, episodes: list[Episode]) -> dict[str, list[Sample]]:
        """Per agent: one Sample per distinct response, advantage = mean over its joint actions."""
        samples: dict[str, list[Sample]] = {a: [] for a in self.cfg.agents}
        for eps in group_episodes(episodes).values():
            advs = group_advantages([e.reward for e in eps], std_normalize=self.cfg.std_normalize,
                                    clamp=self.cfg.adv_clamp)
            weight = self.cfg.turn_weights[eps[0].meta["turn"]]
            for a_idx, agent in enumerate(self.cfg.agents):
                per_response: dict[str, tuple[Turn, list[float]]] = {}
                for ep, adv in zip(eps, advs):
                    t = ep.turns[a_idx]
                    per_response.setdefault(t.id, (t, []))[1].append(adv)
                for t, adv_list in per_response.values():
                    samples[agent].append(Sample(t.prompt_ids, t.completion_ids, advantage=mean(adv_list),
                                                 weight=weight, behavior_logprobs=t.logprobs or None))
        return samples

    def update(self, episodes, step):
        samples = self.credit(episodes)
        metrics: dict[str, Any] = reward_metrics(episodes)
        for turn in sorted({e.meta["turn"] for e in episodes}):
            metrics[f"reward/turn{turn}"] = mean(e.reward for e in episodes if e.meta["turn"] == turn)
        with self.timer("train"):  # every agent's step dispatched, then awaited: the engine decides the overlap
            pending = {a: self.policies[a].train_async(samples[a], self.loss) for a in self.cfg.agents}
            for a, p in pending.items():
                metrics.update({f"{a}/{k}": v for k, v in p.result().items()})
        metrics["loss"] = mean(metrics.get(f"{a}/loss", float("nan")) for a in self.cfg.agents)
        return metrics

    # ---- evaluation -------------------------------------------------------------------------------
    def _answer(self, tasks, who: dict[str, str], contexts=None) -> Stage:
        """Every role in `who` (role -> policy name) answers every task once, greedily; all
        requests are dispatched before any result is awaited (agents run in parallel). One
        generate call per role, also when two roles' base policies share an engine: the batches
        the baselines were measured with. Returns role -> (its requests, its completions)."""
        contexts = contexts or [{} for _ in tasks]
        reqs = {role: self.requests(role, tasks, temperature=0.0, seed=("eval",),
                                    contexts=[ctx.get(role, {}) for ctx in contexts]) for role in who}
        pending = {role: self.policies[pol].generate_async(reqs[role]) for role, pol in who.items()}
        return {role: (reqs[role], [c[0] for c in p.result()]) for role, p in pending.items()}

    def _method(self, name: str, tasks, who: dict[str, str]) -> list[Stage]:
        """The generation stages of one evaluated method; each stage's roles answer in parallel."""
        agents = list(who)
        if name in ("trained", "naive", "single"):
            return [self._answer(tasks, who)]
        if name == "sequential":  # agent k sees the outputs of agents 1..k-1 (by name)
            stages: list[Stage] = []
            for k, a in enumerate(agents):
                ctx = [{a: {b: st[b][1][i].text for st, b in zip(stages, agents[:k])}} for i in range(len(tasks))]
                stages.append(self._answer(tasks, {a: who[a]}, ctx))
            return stages
        if name == "discussion":  # parallel first answers, then one revision after reading the others'
            first = self._answer(tasks, who)
            text = {role: [c.text for c in comps] for role, (_, comps) in first.items()}
            ctx = [{a: {"previous": text[a][i],
                        "feedback": DISCUSSION_FEEDBACK.format(others="\n\n".join(
                            f"[{b}]\n{text[b][i].strip()}" for b in agents if b != a))} for a in agents}
                   for i in range(len(tasks))]
            return [first, self._answer(tasks, who, ctx)]
        raise ValueError(f"unknown evaluation method {name!r}")

    def _score_method(self, name: str, tasks, prefix: str = "") -> tuple[dict[str, list[float]], dict[str, float]]:
        """Run one method on `tasks` and score it: (per-task outcomes, costs), keys `<prefix><key>`.
        Outcomes: reward and components (the env's scale for the roles involved), solved (reward at
        that max; left out when the max is unknown), pass (all unit tests passed, for envs with a
        `tests` component). Costs:
        generations and tokens per task, and wall-clock generation cost: latency_s = seconds from
        sending the batch's prompts to the last final output (all tasks batched together),
        tokens_per_s = generated tokens / latency_s. The final outputs are kept as `<prefix>reward`'s
        replies (`keep_replies`: one joint reply per task, scored by the reward)."""
        agents = self.cfg.agents
        who = {"trained": {a: a for a in agents},
               "single": {"single": base(agents[0])}}.get(name, {a: base(a) for a in agents})
        t0 = time.perf_counter()
        stages = self._method(name, tasks, who)
        seconds = time.perf_counter() - t0
        final = {role: answers for st in stages for role, answers in st.items()}  # later stages overwrite
        scores = self.env.reward_batch([(t, {r: final[r][1][i].text for r in who}) for i, t in enumerate(tasks)])
        top = self.env.max_reward_for(list(who))
        tokens = sum(len(c.completion_ids) for st in stages for _, comps in st.values() for c in comps)
        outcomes = score_outcomes(scores, prefix)
        self.keep_replies(f"{prefix}reward", tasks, {role: (reqs, [c.text for c in comps])
                                                     for role, (reqs, comps) in final.items()},
                          outcomes[f"{prefix}reward"], "reward")
        if math.isfinite(top):  # an env.reward_fn without a declared max_reward leaves "solved" undefined
            outcomes[f"{prefix}solved"] = [float(s.total >= top - 1e-9) for s in scores]
        if "tests" in scores[0].components:
            outcomes[f"{prefix}pass"] = [float(s.components.get("tests", 0.0) >= 1.0 - 1e-9) for s in scores]
        costs = {"gens": float(sum(len(st) for st in stages)), "tokens": tokens / len(tasks),
                 "latency_s": seconds, "tokens_per_s": tokens / seconds if seconds > 0 else float("nan")}
        return outcomes, {f"{prefix}{k}": v for k, v in costs.items()}

    def _baseline(self, name: str, tasks):
        outcomes, costs = self._score_method(name, tasks, prefix=f"{name}/")
        log.info("MAGRPO baseline %r on %d eval tasks: reward %.3f (untrained weights, greedy: computed once, "
                 "reused at later evaluations of these tasks)", name, len(tasks), mean(outcomes[f"{name}/reward"]))
        return outcomes, costs

    def evaluate(self, tasks):
        """The trained agents (unprefixed keys) and the baselines (`<baseline>/<key>`), with
        intervals, and the paired differences of the trained pair's reward against each baseline's
        (`diff/reward-<baseline>/reward`). Baselines run on frozen weights with greedy decoding,
        so they are computed at the first evaluation of a task set and reused afterwards."""
        if not tasks:
            return {}
        outcomes, costs = self._score_method("trained", tasks)
        for name in self.cfg.eval_baselines:
            base_outcomes, base_costs = self.frozen_baseline(name, tasks, lambda: self._baseline(name, tasks))
            outcomes.update(base_outcomes)
            costs.update(base_costs)
        return {**self.eval_metrics(outcomes), **costs}
