"""GRPO: one policy, G samples per prompt, group-relative advantages — the single-agent baseline.

What GRPO specifies (DeepSeekMath, arXiv 2402.03300): G samples per prompt, advantage = (reward -
group mean) / group std, a PPO-style clipped ratio and a KL penalty to a reference policy. Our
defaults follow Dr. GRPO (arXiv 2503.20783): no std division and token sums divided by a constant
(`rollout.max_new_tokens`) instead of each sample's length; `std_normalize=true,
loss_agg=seq_mean_token_mean` gives the original GRPO. Where the papers leave it open: one
optimiser step per batch (so the ratio is 1 at the step and the clip only bounds it), KL off by
default (`kl_coef > 0` keeps a frozen copy of the base as the reference, scored by the learner),
evaluation is one greedy sample per held-out task.
"""
from __future__ import annotations

from dataclasses import dataclass

from algorithms.base import Algorithm, PGConfig, group_samples, reward_metrics, score_metrics
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Episode, Turn

ROLE = "single"


@dataclass
class GRPOConfig(PGConfig):
    name: str = "grpo"
    group_size: int = 8


@register_algorithm("grpo")
class GRPO(Algorithm):
    Config = GRPOConfig

    def policy_specs(self):
        return [PolicySpec("policy", self.run.model, trainable=True, reference=self.cfg.kl_coef > 0)]

    def collect(self, tasks, step):
        with self.timer("generate"):
            groups = self.policies["policy"].generate(
                self.requests(ROLE, tasks, self.cfg.group_size, seed=("collect", step)))
        episodes = []
        with self.timer("reward"):
            for task, comps in zip(tasks, groups):
                for c in comps:
                    r = self.env.reward(task, {ROLE: c.text})
                    turn = Turn.from_completion(c, agent=ROLE, policy="policy", reward=r.total)
                    episodes.append(Episode(task=task, turns=[turn], reward=r.total,
                                            components=r.components, group=str(task["id"]), step=step))
        return episodes

    def update(self, episodes, step):
        samples = group_samples(episodes, std_normalize=self.cfg.std_normalize)
        with self.timer("train"):
            train_metrics = self.policies["policy"].train(samples, self.loss)
        return {**reward_metrics(episodes), **train_metrics}

    def evaluate(self, tasks):
        """Greedy single-sample score of the policy on held-out tasks."""
        outs = self.policies["policy"].generate(self.requests(ROLE, tasks, temperature=0.0))
        return score_metrics([self.env.reward(t, {ROLE: o[0].text}) for t, o in zip(tasks, outs)])
