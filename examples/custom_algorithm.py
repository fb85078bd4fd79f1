"""A custom algorithm plugin in one file: RAFT (reward-ranked fine-tuning).

Per task, sample G answers, keep the best one if it beats the group mean, and fine-tune on the
kept answers with the SFT loss. Run it with the plugin module and its config folder:

    python -m marl_llm.train plugins=[examples.custom_algorithm] \
        'hydra.searchpath=[file://examples/conf]' algo=raft env=toy model=tiny trainer.steps=2

From another package, expose the module through the entry-point group `marl_llm.algorithms`
instead of `plugins=`; the config file then ships in that package's search path.

It uses the shared scaffolding of algorithms/base.py: `self.requests` (seeded requests with the
run's sampling settings), `group_episodes`, `reward_metrics`, `score_outcomes` and
`self.eval_metrics` (evaluation numbers with 95% intervals), and the config-validation helpers of
marl_llm/config.py.
"""
from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import AlgoConfig, Algorithm, group_episodes, reward_metrics, score_outcomes
from marl_llm.config import check_min
from marl_llm.losses import LossConfig
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Episode, Sample, Turn

ROLE = "single"


@dataclass
class RAFTConfig(AlgoConfig):
    name: str = "raft"
    group_size: int = 4

    def __post_init__(self):  # checked at start-up, before any engine starts
        check_min("algo.group_size", self.group_size, 2, "the best answer is ranked against the group's mean")


@register_algorithm("raft")
class RAFT(Algorithm):
    Config = RAFTConfig

    def policy_specs(self):
        return [PolicySpec("policy", self.run.model)]

    def collect(self, tasks, step):
        # protocol: one agent, G samples per task (request i seeded from the run seed, step and i)
        reqs = self.requests(ROLE, tasks, self.cfg.group_size, seed=("collect", step))
        groups = self.policies["policy"].generate(reqs)
        episodes = []
        for task, comps in zip(tasks, groups):
            for c in comps:
                r = self.env.reward(task, {ROLE: c.text})
                episodes.append(Episode(task=task, turns=[Turn.from_completion(c, ROLE, "policy")],
                                        reward=r.total, components=r.components, group=str(task["id"]), step=step))
        return episodes

    def update(self, episodes, step):
        # credit: the best sample of each group, if it is better than the group's mean
        keep = [max(g, key=lambda e: e.reward) for g in group_episodes(episodes).values()
                if max(e.reward for e in g) > mean(e.reward for e in g)]
        metrics = {**reward_metrics(episodes), "raft/kept": len(keep)}
        if keep:  # loss: SFT on the kept answers
            samples = [Sample(e.turns[0].prompt_ids, e.turns[0].completion_ids) for e in keep]
            metrics.update(self.policies["policy"].train(samples, LossConfig(kind="sft")))
        return metrics

    def evaluate(self, tasks):
        outs = self.policies["policy"].generate(self.requests(ROLE, tasks, temperature=0.0))
        return self.eval_metrics(score_outcomes([self.env.reward(t, {ROLE: o[0].text}) for t, o in zip(tasks, outs)]))
