"""GRPO: one policy, G samples per prompt, group-relative advantages — the single-agent baseline.

What GRPO specifies (DeepSeekMath, arXiv 2402.03300): G samples per prompt, advantage = (reward -
group mean) / group std, a PPO-style clipped ratio and a KL penalty to a reference policy. Our
defaults follow Dr. GRPO (arXiv 2503.20783): no std division and token sums divided by a constant
(`rollout.max_new_tokens`) instead of each sample's length; `std_normalize=true,
loss_agg=seq_mean_token_mean` gives the original GRPO. Where the papers leave it open: one
optimiser step per batch (so the ratio is 1 at the step and the clip only bounds it), KL off by
default (`kl_coef > 0` keeps a frozen copy of the base as the reference, scored by the learner),
evaluation is one greedy sample per held-out task.

Evaluation: the policy's greedy reward and components per held-out task, with 95% intervals;
with `eval_baselines: [base]` (default) also the untrained model (`base/...`: a frozen copy of
`model=`, rollout workers only, greedy, computed at the first evaluation of a task set and reused)
and the paired differences trained - base (`diff/reward-base/reward`, and `diff/correct-base/correct`
where the env scores correctness: `comparisons`). The replies are kept under `correct` and
`base/correct` on an answer env (with the `lenient/` and `noanswer/` outcomes and
`diff/lenient/correct-lenient/base/correct`), else under `reward` and `base/reward`
(algorithms/base.py "Replies").
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

from algorithms.base import Algorithm, PGConfig, group_samples, reward_metrics, score_outcomes
from envs.qa import reads_answers
from marl_llm.config import check_entries
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Episode, Turn

log = logging.getLogger(__name__)
ROLE = "single"
BASE = "base"  # the frozen untrained model (the "before" of every evaluation)
EVAL_BASELINES = (BASE,)
HEADLINE = ("reward", "correct")


@dataclass
class GRPOConfig(PGConfig):
    name: str = "grpo"
    group_size: int = 8
    eval_baselines: list[str] = field(default_factory=lambda: list(EVAL_BASELINES))

    def __post_init__(self):
        super().__post_init__()
        check_entries("algo.eval_baselines", self.eval_baselines, EVAL_BASELINES)


@register_algorithm("grpo")
class GRPO(Algorithm):
    Config = GRPOConfig
    headline = HEADLINE

    def required_roles(self):
        return (ROLE,)

    def policy_specs(self):
        specs = [PolicySpec("policy", self.run.model, trainable=True, reference=self.cfg.kl_coef > 0)]
        if BASE in self.cfg.eval_baselines:
            specs.append(PolicySpec(BASE, self.run.model, trainable=False))
        return specs

    def comparisons(self):
        return [(k, f"{BASE}/{k}") for k in HEADLINE] if BASE in self.cfg.eval_baselines else []

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
        """Greedy single-sample score of the policy on held-out tasks, next to the untrained base
        model's (`frozen_baseline`: computed at the first evaluation, reused) and the paired differences."""
        if not tasks:
            return {}
        reqs = self.requests(ROLE, tasks, temperature=0.0)
        pending = self.policies["policy"].generate_async(reqs)
        # the base model generates while the policy's batch is in flight
        base = self.frozen_baseline(BASE, tasks, lambda: self._base_outcomes(tasks)) \
            if BASE in self.cfg.eval_baselines else {}
        outcomes = {**self._score(tasks, reqs, pending.result()), **base}
        return self.eval_metrics(outcomes)

    def _score(self, tasks, reqs, outs, prefix: str = "") -> dict[str, list[float]]:
        """The outcomes of one reply per task, keeping the replies under `<prefix>correct` on an
        answer env (whose reward has its `correct` component), else under `<prefix>reward`."""
        texts = [o[0].text for o in outs]
        outcomes = score_outcomes(self.env.reward_batch([(t, {ROLE: x}) for t, x in zip(tasks, texts)]), prefix)
        scored = "correct" if reads_answers(self.env) and f"{prefix}correct" in outcomes else "reward"
        self.keep_replies(f"{prefix}{scored}", tasks, {ROLE: (reqs, texts)}, outcomes[f"{prefix}{scored}"], scored)
        return outcomes

    def _base_outcomes(self, tasks) -> dict[str, list[float]]:
        reqs = self.requests(ROLE, tasks, temperature=0.0)
        base = self._score(tasks, reqs, self.policies[BASE].generate(reqs), f"{BASE}/")
        log.info("GRPO baseline: the untrained model (greedy) scores reward %.3f on %d eval tasks "
                 "(computed once, reused at later evaluations of these tasks)", mean(base[f"{BASE}/reward"]), len(tasks))
        return base
