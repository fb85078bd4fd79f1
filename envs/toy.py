"""A toy environment with a dense reward that even a random-init model can learn quickly.

Single agent: reward = share of the completion's letters that are in `target_chars` (vowels by
default). A tiny random model starts near the vocabulary's average share; RL that is wired right
raises it within a few dozen steps. Used by the learning-signal tests and as the quickest smoke run.

Two agents (`agent1`, `agent2`): a cooperative version that needs complementary outputs — the
joint reward is share(agent1) * (1 - share(agent2)): agent 1 must move towards the target letters
and agent 2 away from them, and neither scores alone.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from envs.base import Env, EnvConfig, Reward
from marl_llm.registry import register_env


@dataclass
class ToyConfig(EnvConfig):
    name: str = "toy"
    target_chars: str = "aeiou"
    train_size: int = 256
    eval_size: int = 16


@register_env("toy")
class ToyEnv(Env):
    Config = ToyConfig
    roles = ("single", "agent1", "agent2")
    max_reward = 1.0

    def _tasks(self, start: int, n: int) -> list[dict[str, Any]]:
        return [{"id": f"toy-{i}", "topic": f"thing number {i}"} for i in range(start, start + n)]

    def _load(self):
        return self._tasks(0, self.cfg.train_size), self._tasks(self.cfg.train_size, self.cfg.eval_size)

    def prompt(self, task, role="single", **context):
        return [{"role": "user", "content": f"Write a few words about {task['topic']}."}]

    def share(self, text: str) -> float:
        letters = [c for c in text.lower() if c.isalpha()]
        return sum(c in self.cfg.target_chars for c in letters) / len(letters) if letters else 0.0

    def reward(self, task, outputs: dict[str, str]) -> Reward:
        if set(outputs) == {"agent1", "agent2"}:
            a, b = self.share(outputs["agent1"]), 1.0 - self.share(outputs["agent2"])
            return Reward(a * b, {"agent1_share": a, "agent2_other": b})
        shares = [self.share(t) for t in outputs.values()]
        total = sum(shares) / len(shares) if shares else 0.0
        return Reward(total, {"share": total})

    def reference_outputs(self, task):
        return {"single": "aeiou"}
