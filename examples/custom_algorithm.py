"""A new multi-agent protocol in one file: propose, critique, revise (on any answer env).

    python -m marl_llm.train plugins=[examples.custom_algorithm] \\
        'hydra.searchpath=[file://examples/conf]' algo=proposer_critic env=math model=tiny trainer.steps=2

This file and its config, examples/conf/algo/proposer_critic.yaml, are the whole protocol: nothing
in envs/ or marl_llm/ knows about it. (From another package, expose the module through the
entry-point group `marl_llm.algorithms` instead of `plugins=`; the YAML then ships in that
package's Hydra search path.)

Protocol, per task: the proposer (trainable) answers G times, prompted by the env as a single
solver; a critic (a frozen copy of the model; `algo.role_models.critic` may name another preset)
critiques each answer; the proposer revises each answer after reading its critique. The critique
and revision prompts are this protocol's own (CRITIQUE, REVISE), filled with the env's question
and answer instruction by `self.answer_prompt`.
Credit: the reward of the revision, group-relative over the G chains of a task: A_g = R_g - mean R;
both proposer turns of chain g (its first answer and its revision) take A_g.
Loss: policy gradient on the proposer (`PGConfig`: group size, clip, KL, aggregation).
Evaluation (greedy, one chain per held-out task): the score after revision and the first answer's
(`first/...`), and their paired differences (`diff/correct-first/correct`): what the critique adds.
Both answers are kept (`keep_replies`: saved as `replies/correct.jsonl`, `replies/first.correct.jsonl`
next to the evaluation's outcomes, with `lenient/` and `noanswer/` outcomes for each).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

from algorithms.base import Algorithm, PGConfig, group_episodes, reward_metrics, score_outcomes
from marl_llm.advantages import group_advantages
from marl_llm.metrics import mean
from marl_llm.policy import PolicySpec
from marl_llm.registry import register_algorithm
from marl_llm.types import Episode, Sample, Turn

SOLVER = "single"  # the env's own role: its task prompt and its answer stop strings
PROPOSER, CRITIC = "proposer", "critic"
CRITIQUE = ("{question}\n\nA student's solution:\n{answer}\n\nCheck this solution step by step and point out "
            "any mistakes. Do not write a new solution.")
REVISE = ("{question}\n\nYour solution:\n{answer}\n\nA reviewer's critique of it:\n{critique}\n\n"
          "Using the critique where it is right, write your final solution. {answer_instruction}")


@dataclass
class ProposerCriticConfig(PGConfig):
    name: str = "proposer_critic"
    # role (proposer, critic) -> model preset (conf/model/<name>.yaml); a role not listed uses model=
    role_models: dict[str, Optional[str]] = field(default_factory=dict)


@register_algorithm("proposer_critic")
class ProposerCritic(Algorithm):
    Config = ProposerCriticConfig
    headline = ("reward", "correct")
    env_hooks = ("question_text", "instruction", "messages")  # what `answer_prompt` reads

    def required_roles(self):
        return (SOLVER,)

    def policy_specs(self):
        return [PolicySpec(PROPOSER, self.role_model(PROPOSER), reference=self.cfg.kl_coef > 0),
                PolicySpec(CRITIC, self.role_model(CRITIC), trainable=False)]

    def comparisons(self):
        return [("reward", "first/reward"), ("correct", "first/correct")]

    # ---- protocol ---------------------------------------------------------------------------------
    def critique_prompt(self, task, answer):
        return self.answer_prompt(CRITIQUE, task, answer=answer)

    def revise_prompt(self, task, answer, critique):
        return self.answer_prompt(REVISE, task, answer=answer, critique=critique)

    def chains(self, tasks, n, seed, temperature=None):
        """Per task, n chains (first answer, critique, revision) of Completions; and the requests
        of the first answers (one per task) and of the revisions (one per chain)."""
        proposer, critic = self.policies[PROPOSER], self.policies[CRITIC]
        first_requests = self.requests(SOLVER, tasks, n, temperature, seed=(*seed, "first"))
        first = proposer.generate(first_requests)
        answers = [c for group in first for c in group]
        chain_tasks = [t for t, group in zip(tasks, first) for _ in group]
        critiques = [c[0] for c in critic.generate(self.requests(
            CRITIC, chain_tasks, 1, temperature, seed=(*seed, "critique"), prompt=self.critique_prompt,
            contexts=[{"answer": a.text} for a in answers], stop=[]))]  # a critique is no answer: no stop
        revise_requests = self.requests(
            SOLVER, chain_tasks, 1, temperature, seed=(*seed, "revise"), prompt=self.revise_prompt,
            contexts=[{"answer": a.text, "critique": c.text} for a, c in zip(answers, critiques)])
        revisions = [c[0] for c in proposer.generate(revise_requests)]
        flat = list(zip(answers, critiques, revisions))
        return [flat[i * n:(i + 1) * n] for i in range(len(tasks))], first_requests, revise_requests

    def scores(self, tasks, texts):
        return self.env.reward_batch([(t, {SOLVER: x}) for t, x in zip(tasks, texts)])

    def collect(self, tasks, step):
        with self.timer("generate"):
            chains, _, _ = self.chains(tasks, self.cfg.group_size, seed=("collect", step))
        episodes = []
        with self.timer("reward"):
            for task, group in zip(tasks, chains):
                before = self.scores([task] * len(group), [a.text for a, _, _ in group])
                after = self.scores([task] * len(group), [r.text for _, _, r in group])
                for (a, c, r), r0, r1 in zip(group, before, after):
                    turns = [Turn.from_completion(a, PROPOSER, PROPOSER, round=0, reward=r0.total),
                             Turn.from_completion(c, CRITIC, CRITIC, round=1),
                             Turn.from_completion(r, PROPOSER, PROPOSER, round=2, reward=r1.total)]
                    episodes.append(Episode(task=task, turns=turns, reward=r1.total, components=r1.components,
                                            group=str(task["id"]), step=step, meta={"first_reward": r0.total}))
        return episodes

    # ---- credit assignment and loss -------------------------------------------------------------
    def credit(self, episodes):
        """A = R(revision) - its group's mean, for both proposer turns of each chain."""
        samples = []
        for group in group_episodes(episodes).values():
            advantages = group_advantages([e.reward for e in group], std_normalize=self.cfg.std_normalize)
            for ep, adv in zip(group, advantages):
                samples += [Sample(t.prompt_ids, t.completion_ids, advantage=adv)
                            for t in ep.turns if t.policy == PROPOSER]
        return samples

    def update(self, episodes, step):
        metrics = {**reward_metrics(episodes), "reward/first": mean(e.meta["first_reward"] for e in episodes)}
        with self.timer("train"):
            metrics.update(self.policies[PROPOSER].train(self.credit(episodes), self.loss))
        return metrics

    # ---- evaluation ------------------------------------------------------------------------------
    def evaluate(self, tasks):
        chains, first_requests, revise_requests = self.chains(tasks, 1, seed=("eval",), temperature=0.0)
        answers, revisions = [g[0][0].text for g in chains], [g[0][2].text for g in chains]
        outcomes = {**score_outcomes(self.scores(tasks, revisions)),
                    **score_outcomes(self.scores(tasks, answers), "first/")}
        # the replies behind the compared accuracies, saved with the evaluation (one chain per task)
        for name, requests, texts in (("correct", revise_requests, revisions),
                                      ("first/correct", first_requests, answers)):
            self.keep_replies(name, tasks, {SOLVER: (requests, texts)}, outcomes[name], "correct")
        return self.eval_metrics(outcomes)
