"""The algorithm plugin interface and the scaffolding every plugin shares.

An algorithm owns its protocol (who sees what, in which order), its credit assignment and the
loss each policy trains with. The framework owns engines, the trajectory buffer, checkpoints,
logging and evaluation scheduling. Subclass `Algorithm`, set `Config` to a dataclass with a
`name` field, and decorate with `@register_algorithm("my_algo")`.

The shared scaffolding (one way each, used by the built-in plugins and the example):
  `group_episodes`   episodes by `Episode.group`, in order of first appearance
  `group_samples`    single-turn credit: A = R - group mean (optionally / std) per group
  `reward_metrics`   the standard metrics block: reward/mean, reward/max, reward/<component>,
                     groups/mixed, tokens/completion_mean
  `score_outcomes`   per-task outcomes of scored outputs: reward and each reward component
  `score_metrics`    their means (an evaluation block without intervals)
  `outcome_metrics` / `Algorithm.eval_metrics`   the evaluation block with 95% intervals and
                     the paired differences of `Algorithm.comparisons` (see below)
  `correct_of`       was this answer right: a reward's `correct` component, else reward at its max
  `majority_index` / `vote`   majority vote over extracted answers (ties: the answer seen first)
  `train_epochs`     SFT/DPO epochs over a dataset (`TrainJob` per policy, seeded local shuffles),
                     several policies in lockstep through `Policy.train_async`
  `seed_for` / `Algorithm.seed`   request seeds from the run seed and a request's coordinates
  `Algorithm.sampling`            a SamplingConfig from `rollout.*` (top_p 1.0 at temperature 0)
  `Algorithm.requests`            one seeded GenerationRequest per task for a role (the env's
                                  prompt, or the algorithm's own `prompt=`)
  `Algorithm.answer_prompt`       a protocol's own role prompt on an answer env (its template
                                  filled with the env's question and answer instruction)
  `Algorithm.role_model`          a role's model (`algo.role_models` preset, else `model=`)
  `Algorithm.validate`            the one config check needing the run or env (pre-flight calls
                                  it): `required_roles`, `env_hooks`, `role_models` keys, plus
                                  whatever the plugin adds
  `Algorithm.frozen_baseline`     a baseline on frozen weights computed once per eval task set, then
                                  reused (its kept replies too)
  `Algorithm.keep_replies`        keep the replies behind an evaluation metric (saved and re-scorable)
  `Algorithm.eval_decoding`       how each kept reply set was decoded: "greedy" or "temperature T, seed S"
  `PGConfig` + `Algorithm.loss`   group size and policy-gradient loss settings, validated

Evaluation: `evaluate(tasks)` collects one outcome per task for every metric it reports (0/1
correctness, a reward, a share) and returns `self.eval_metrics(outcomes)`: each metric's
mean with `<metric>/ci_low`, `/ci_high` and `/n` (marl_llm/stats.py's convention: a Wilson interval
for 0/1 outcomes, a Student t interval otherwise), and for each (a, b) in `comparisons()` the paired
difference `diff/<a>-<b>` of two policies scored on the same tasks. The outcomes are kept in
`eval_outcomes` (what `python -m marl_llm.evaluate baseline=init` pairs across two evaluations).
In a pair (a, b), b is a's baseline: that is how the run report knows what to draw side by side.
Costs (generations, tokens, latency) are reported without intervals.

Replies: an evaluation keeps the replies behind each metric it compares (`keep_replies(name, ...)`,
name = the metric, e.g. GRPO's `correct` and `base/correct`): one row per task with the task, the
prompt, the reply, the temperature and seed it was sampled with, what was scored and the score
(exactly the outcome logged for that metric and task). `eval_metrics` publishes them in
`eval_replies` and marl_llm/eval_store.py saves them as `replies/<name>.jsonl` next to
`outcomes.json`, where `rescore` re-scores them with the env. On an answer env (envs/qa.py) a row
also holds the strict and the lenient reading of the reply (`answer`, `lenient_answer`), and every
metric scored by correctness gets two more outcomes: `noanswer/<metric>` (1: the strict reading
found no answer) and `lenient/<metric>` (the correctness of the lenient reading), and each compared
pair (a, b) also `diff/lenient/<a>-lenient/<b>`. `eval_decoding` labels each reply set "greedy"
(temperature 0) or "temperature T, seed S" (S: the run seed every request seed derives from).

Reference log-probs have one path: an algorithm sets `PolicySpec(reference=True)` (a KL term with
`kl_coef > 0`, DPO) and the learner scores the reference inside each train step; algorithms never
make a separate reference call.
"""
from __future__ import annotations

import dataclasses
import random
import zlib
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Optional, Sequence

from envs.base import Env, Reward, fill, majority_index  # noqa: F401  (fill, majority_index: part of this API)
from envs.qa import reads_answers
from marl_llm.advantages import group_advantages
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import (ConfigError, ModelConfig, RolloutConfig, RunConfig, check, check_choice, check_min,
                             check_positive, load_role_model)
from marl_llm.losses import PG_AGGREGATIONS, LossConfig
from marl_llm.metrics import PhaseTimer, mean
from marl_llm.policy import Policy, PolicySpec
from marl_llm.stats import diff_key, interval_metrics, mean_interval, paired_difference, wilson_interval
from marl_llm.types import Episode, GenerationRequest, PairSample, Sample, SamplingConfig, chunks

#: the outcome-name prefixes of the two readings of an answer env's replies (`reading_outcomes`)
LENIENT, NOANSWER = "lenient", "noanswer"


@dataclass
class AlgoConfig:
    name: str = ""


@dataclass
class PGConfig(AlgoConfig):
    """Settings of a group-relative policy-gradient algorithm (GRPO, MLPO, MAGRPO)."""

    group_size: int = 4                 # G samples per prompt (a group)
    std_normalize: bool = False         # A = (R - mean) / std (GRPO) instead of R - mean (Dr. GRPO)
    clip_eps: Optional[float] = 0.2     # PPO ratio clip; null: none
    kl_coef: float = 0.0                # KL to the reference (the learner scores it)
    loss_agg: str = "token_sum_norm"    # marl_llm.losses.PG_AGGREGATIONS

    def __post_init__(self):
        check_min("algo.group_size", self.group_size, 2,
                  "group-relative advantages (R - group mean) are all zero with one sample per group")
        check(self.clip_eps is None or self.clip_eps > 0, "algo.clip_eps", self.clip_eps,
              "must be > 0 or null (no clipping)")
        check_positive("algo.kl_coef", self.kl_coef, allow_zero=True)
        check_choice("algo.loss_agg", self.loss_agg, PG_AGGREGATIONS)


class Algorithm:
    Config = AlgoConfig
    #: the evaluation metrics that say whether training helped (`python -m marl_llm.evaluate
    #: baseline=init` prints their after - before differences); those an evaluation reports count
    headline: tuple[str, ...] = ("reward",)
    #: env methods the protocol builds on (e.g. an answer env's `question_text`); `validate` checks them
    env_hooks: tuple[str, ...] = ()

    def __init__(self, cfg: Any, env: Env, run: RunConfig):
        self.cfg = cfg
        self.env = env
        self.run = run
        self.policies: dict[str, Policy] = {}
        self.buffer: TrajectoryBuffer | None = None
        self.eval_outcomes: dict[str, list[float]] = {}  # per-task outcomes of the last evaluation
        self.eval_replies: dict[str, list[dict[str, Any]]] = {}  # name -> one reply row per task (keep_replies)
        self._replies: dict[str, list[dict[str, Any]]] = {}  # kept by the evaluation under way
        self._baselines: dict[str, tuple[tuple, Any, dict]] = {}  # name -> (eval task ids, result, replies)
        # phase timer: `with self.timer("generate"): ...` splits step time by phase (the trainer's
        # own timer once `setup` has run)
        self.timer = PhaseTimer()

    def policy_specs(self) -> list[PolicySpec]:
        """The policies this algorithm needs; the framework builds them before `setup`. Declare
        one spec per role: frozen policies with the same base weights share one engine (the
        engine decides), and `model.lora` makes trainable ones adapters of one base."""
        raise NotImplementedError

    # ---- validation: the one hook, called by the pre-flight check before any engine starts ------
    def required_roles(self) -> tuple[str, ...]:
        """The env roles this algorithm prompts through `env.prompt`."""
        return ()

    def roles(self) -> tuple[str, ...]:
        """The names `algo.role_models` may map to a model preset (default: the policy names)."""
        return tuple(s.name for s in self.policy_specs())

    def validate(self) -> None:
        """Everything about the config that needs the run or the env (field-level checks of the
        algorithm's own config are its dataclass's `__post_init__`). Raise `ConfigError` naming
        the bad value and what is allowed. Subclasses extend it and call `super().validate()`."""
        name, env = self.cfg.name, self.env.cfg.name
        missing = [r for r in self.required_roles() if r not in self.env.roles]
        if missing:
            raise ConfigError(f"algo={name} needs env roles {missing}; env {env!r} has {list(self.env.roles)}")
        absent = [h for h in self.env_hooks if not callable(getattr(self.env, h, None))]
        if absent:
            raise ConfigError(f"algo={name} builds its prompts on an answer env (env methods {list(self.env_hooks)}); "
                              f"env {env!r} has no {absent} (use e.g. env=math)")
        role_models = getattr(self.cfg, "role_models", None) or {}
        if role_models:
            roles = self.roles()
            unknown = sorted(set(role_models) - set(roles))
            check(not unknown, "algo.role_models", dict(role_models),
                  f"is not allowed: keys must be roles of {list(roles)} (got {unknown})")
            for value in role_models.values():
                if value:
                    load_role_model(value, self.run.model)  # an unknown preset or bad folder fails here

    def setup(self, policies: dict[str, Policy], buffer: TrajectoryBuffer,
              timer: Optional[PhaseTimer] = None) -> None:
        self.policies = policies
        self.buffer = buffer
        if timer is not None:
            self.timer = timer

    def prepare(self, tasks: list[dict[str, Any]]) -> list[dict[str, Any]]:
        """One-off work before training (e.g. MLPO's team answers, MALT's tree); returns the
        training tasks to use (an algorithm may filter them). Called on a fresh run only."""
        return tasks

    def collect(self, tasks: list[dict[str, Any]], step: int) -> list[Episode]:
        """Run the protocol on a batch of tasks; the returned episodes go into the buffer."""
        raise NotImplementedError

    def update(self, episodes: list[Episode], step: int) -> dict[str, float]:
        """Credit assignment and one training step per trainable policy; returns metrics."""
        raise NotImplementedError

    def evaluate(self, tasks: list[dict[str, Any]]) -> dict[str, float]:
        """Metrics of the current policies on held-out tasks, with intervals: build them with
        `self.eval_metrics`, after keeping the replies behind each compared metric
        (`keep_replies`). How each was decoded is `eval_decoding`."""
        raise NotImplementedError

    def state_dict(self) -> dict[str, Any]:
        """Algorithm state saved with each checkpoint (JSON-serialisable)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    # ---- shared helpers ---------------------------------------------------------------------------
    def seed(self, *parts: Any) -> int:
        """A request seed from the run seed and the request's coordinates (phase, step, role, index)."""
        return seed_for(self.run.seed, *parts)

    def sampling(self, n: int = 1, temperature: Optional[float] = None, seed: Optional[int] = None,
                 stop: Optional[list[str]] = None) -> SamplingConfig:
        """`n` samples at `temperature` (default `rollout.temperature`) with `rollout.*` settings."""
        return sampling(self.run.rollout, n, temperature, seed, stop)

    def requests(self, role: str, tasks: Sequence[dict[str, Any]], n: int = 1, temperature: Optional[float] = None,
                 seed: Optional[tuple] = None, contexts: Optional[Sequence[dict[str, Any]]] = None,
                 prompt: Optional[Callable[..., list[dict[str, str]]]] = None,
                 stop: Optional[list[str]] = None) -> list[GenerationRequest]:
        """One request per task for `role`: `prompt(task, **context)` (default: the env's prompt
        for `role`) with that task's entry of `contexts`, `n` samples at `temperature` (default
        `rollout.temperature`); request i is seeded with `self.seed(*seed, i)` (no seed if `seed`
        is None); replies end at `stop` (default: the env's stop strings for `role`)."""
        if prompt is None:
            prompt = lambda task, **ctx: self.env.prompt(task, role, **ctx)  # noqa: E731
        stop = (self.env.stop(role) if stop is None else stop) or None
        return [GenerationRequest(messages=prompt(t, **(contexts[i] if contexts else {})),
                                  sampling=self.sampling(n, temperature, None if seed is None else self.seed(*seed, i),
                                                         stop))
                for i, t in enumerate(tasks)]

    def answer_prompt(self, template: str, task: dict[str, Any], **values: Any) -> list[dict[str, str]]:
        """A protocol's own prompt on an answer env: `template` filled with the task's
        `{question}`, the env's `{answer_instruction}` and `values`, as the env's chat messages;
        `values` too long for the model are cut like any prompt context (`Env.fit_context`)."""
        return self.env.fit_context(lambda **ctx: self.answer_messages(template, task, **ctx), task,
                                    f"{self.cfg.name} prompt", values)

    def answer_messages(self, template: str, task: dict[str, Any], **values: Any) -> list[dict[str, str]]:
        """`answer_prompt` without the cut (for a prompt that formats list contexts itself and
        hands them to `env.fit_context`, so each item is cut rather than the joined text)."""
        return self.env.messages(fill(template, question=self.env.question_text(task),
                                      answer_instruction=self.env.instruction(task), **values))

    def role_model(self, role: str) -> ModelConfig:
        """The model of `role`: its `algo.role_models` entry (a preset or a saved model's folder,
        with the run's `model.lora`), else the run's `model=`."""
        value = (getattr(self.cfg, "role_models", None) or {}).get(role)
        if not value:
            return self.run.model
        model = load_role_model(value, self.run.model)
        # LoRA is the run's choice (`model.lora`): a role's own base model gets the same adapters
        return model if model.lora is not None else dataclasses.replace(model, lora=self.run.model.lora)

    def comparisons(self) -> list[tuple[str, str]]:
        """The (metric, its baseline's metric) pairs every evaluation reports as paired
        differences `diff/<a>-<b>` (those whose metrics it has); the report learns from them
        which metric is which one's baseline."""
        return []

    def eval_metrics(self, outcomes: Mapping[str, Sequence[float]]) -> dict[str, float]:
        """The end of an evaluation: publishes the replies kept since the last one in
        `eval_replies`, adds their `lenient/` and `noanswer/` outcomes (`reading_outcomes`), keeps
        all outcomes in `eval_outcomes` and returns `outcome_metrics(outcomes, self.comparisons())`."""
        self.eval_replies, self._replies = self._replies, {}
        outcomes = {**outcomes, **reading_outcomes(self.eval_replies, outcomes)}
        self.eval_outcomes = {k: [float(x) for x in v] for k, v in outcomes.items()}
        return outcome_metrics(self.eval_outcomes, self.comparisons())

    def keep_replies(self, name: str, tasks: Sequence[dict[str, Any]],
                     replies: Mapping[str, tuple[Sequence[GenerationRequest], Sequence[str]]],
                     scores: Sequence[float], scored: str,
                     candidates: Optional[Sequence[Sequence[str]]] = None) -> None:
        """Keep the replies behind metric `name` of the evaluation under way (`reply_rows`; saved
        as `replies/<name>.jsonl` by marl_llm/eval_store.py). `replies`: role -> (its requests,
        its reply texts), one of each per task; several roles are one joint output scored together
        (MAGRPO's agents). `scores`: the outcome logged for `name`, per task. `scored`: what a
        score is, so that `eval_store.rescore` can recompute it: "reward" (the env reward's total)
        or a reward component ("correct": `correct_of`). `candidates`: for a majority vote, per
        task the replies voted over (the kept reply is the one the vote picked)."""
        self._replies[name] = reply_rows(self.env, tasks, replies, scores, scored, candidates)

    def eval_decoding(self) -> dict[str, str]:
        """How each reply set of the last evaluation was decoded: name -> "greedy" (temperature
        0) or "temperature T, seed S" (S: the run seed every request seed is derived from)."""
        return {name: decoding_label(reply_temperatures(rows), self.run.seed)
                for name, rows in self.eval_replies.items()}

    def frozen_baseline(self, name: str, tasks: Sequence[dict[str, Any]], compute: Callable[[], Any]) -> Any:
        """The result of a baseline on frozen weights and seeded requests (it cannot change
        between evaluations): `compute()` runs at the first evaluation of a task set, and later
        evaluations of the same tasks (by id) reuse its result and the replies it kept."""
        key = tuple(t["id"] for t in tasks)
        if name not in self._baselines or self._baselines[name][0] != key:
            before = dict(self._replies)
            result = compute()
            kept = {k: rows for k, rows in self._replies.items() if before.get(k) is not rows}
            self._baselines[name] = (key, result, kept)
        self._replies.update(self._baselines[name][2])
        return self._baselines[name][1]

    @property
    def loss(self) -> LossConfig:
        """The policy-gradient loss of a `PGConfig` algorithm (token sums over
        `rollout.max_new_tokens` for `token_sum_norm`)."""
        if not isinstance(self.cfg, PGConfig):
            raise NotImplementedError(f"{type(self).__name__}: Config is not a PGConfig; define its own loss")
        trainer = self.run.trainer
        return LossConfig(kind="pg", clip_eps=self.cfg.clip_eps, kl_coef=self.cfg.kl_coef, agg=self.cfg.loss_agg,
                          norm_tokens=self.run.rollout.max_new_tokens,
                          # samples of older weights (trainer.max_staleness >= 1) are reweighted
                          off_policy=trainer.off_policy if trainer.max_staleness > 0 else "none",
                          is_cap=trainer.is_cap, behavior_temperature=self.run.rollout.temperature)


def seed_for(*parts: Any) -> int:
    """A 32-bit seed from any values (run seed, phase, step, index, ...): the same in every process
    (crc32 of their text, not Python's salted hash) and different for different coordinates."""
    return zlib.crc32("-".join(map(str, parts)).encode())


def correct_of(reward: Reward, max_reward: float) -> float:
    """Whether a scored answer is right: its `correct` component, else 1.0 iff the reward is at
    its maximum (e.g. a unit-test pass rate of 1)."""
    return float(reward.components.get("correct", float(reward.total >= max_reward - 1e-9)))


def score_of(reward: Reward, scored: str, max_reward: float) -> float:
    """The score an evaluation logs from `reward` (`Algorithm.keep_replies`' `scored`): the total
    for "reward", `correct_of` for "correct", else that component (the total where it is absent,
    as MALT's leaf values read `algo.reward_key`)."""
    if scored == "reward":
        return float(reward.total)
    if scored == "correct":
        return correct_of(reward, max_reward)
    return float(reward.components.get(scored, reward.total))


# ---- kept replies (Algorithm.keep_replies; saved by marl_llm/eval_store.py) -------------------------
def reply_rows(env: Env, tasks: Sequence[dict[str, Any]],
               replies: Mapping[str, tuple[Sequence[GenerationRequest], Sequence[str]]],
               scores: Sequence[float], scored: str,
               candidates: Optional[Sequence[Sequence[str]]] = None) -> list[dict[str, Any]]:
    """One JSON row per task: `task_id`, `task` (the task dict: a file re-scores without the
    dataset), `role`, `prompt` (the request's chat messages), `reply` (the text), `temperature`
    and `seed` (the request's sampling), `scored` and `score` (see `Algorithm.keep_replies`).
    One role: `role` is its name and the other fields its own; several roles (a joint output):
    `role` is the list of roles and `prompt`, `reply`, `temperature`, `seed` map each role to its
    own. On an answer env (envs/qa.py, one role) also `answer` (the strict reading the reward
    scores; None: no readable answer) and `lenient_answer` (the lenient reading), and for a
    correctness score `lenient_score`: the score where the lenient reading is the strict one, else
    the env's grade of the lenient answer (math: they differ only on unread answers; reasoning_gym
    also on untagged replies to numeric tasks).
    With `candidates` (a majority vote), also `candidates`: the task's replies voted over."""
    n = len(tasks)
    wrong = {role: (len(reqs), len(texts)) for role, (reqs, texts) in replies.items()
             if len(reqs) != n or len(texts) != n}
    if not replies or wrong or len(scores) != n or (candidates is not None and len(candidates) != n):
        raise ValueError(f"keep_replies needs one request, reply and score (and candidate list) per task "
                         f"({n} tasks); got (requests, replies) per role {wrong or 'none'}, {len(scores)} "
                         f"scores and {'no' if candidates is None else len(candidates)} candidate lists")
    roles = list(replies)
    answers = len(roles) == 1 and reads_answers(env)
    rows = []
    for i, task in enumerate(tasks):
        per_role = {role: (reqs[i], texts[i]) for role, (reqs, texts) in replies.items()}

        def field(get: Callable[[GenerationRequest, str], Any]) -> Any:
            values = {role: get(req, text) for role, (req, text) in per_role.items()}
            return values[roles[0]] if len(roles) == 1 else values

        row = {"task_id": task["id"], "task": task, "role": roles[0] if len(roles) == 1 else roles,
               "prompt": field(lambda req, text: req.messages), "reply": field(lambda req, text: text),
               "temperature": field(lambda req, text: req.sampling.temperature),
               "seed": field(lambda req, text: req.sampling.seed), "scored": scored, "score": float(scores[i])}
        if answers:
            row["answer"] = env.extract_for(task, row["reply"])
            row["lenient_answer"] = env.lenient_for(task, row["reply"])
            if scored == "correct":
                row["lenient_score"] = (row["score"] if row["lenient_answer"] == row["answer"]
                                        else float(env.grade(task, row["lenient_answer"])))
        if candidates is not None:
            row["candidates"] = list(candidates[i])
        rows.append(row)
    return rows


def reading_outcomes(replies: Mapping[str, Sequence[Mapping[str, Any]]],
                     outcomes: Mapping[str, Sequence[float]]) -> dict[str, list[float]]:
    """For every metric of `outcomes` whose kept replies carry a lenient score (correctness on an
    answer env): `lenient/<metric>` (the lenient reading's correctness) and `noanswer/<metric>`
    (1.0 where the strict reading found no answer), one per task."""
    out: dict[str, list[float]] = {}
    for name, rows in replies.items():
        if name in outcomes and rows and all("lenient_score" in r for r in rows):
            out[f"{LENIENT}/{name}"] = [float(r["lenient_score"]) for r in rows]
            out[f"{NOANSWER}/{name}"] = [float(r["answer"] is None) for r in rows]
    return out


def reply_temperatures(rows: Iterable[Mapping[str, Any]]) -> set[float]:
    """The temperatures the rows' replies were sampled at (a joint row's per role)."""
    temps = [r["temperature"] for r in rows]
    return {float(t) for x in temps for t in (x.values() if isinstance(x, Mapping) else [x])}


def decoding_label(temperatures: Iterable[float], seed: int) -> str:
    """A decoding's label: "greedy" for temperature 0, else "temperature T, seed S" (several
    temperatures: each, joined by "and")."""
    temps = sorted(set(temperatures))
    labels = ["greedy" if t == 0 else f"temperature {t:g}" for t in temps]
    return " and ".join(labels) + (f", seed {seed}" if any(t > 0 for t in temps) else "")


@dataclass
class TrainJob:
    """Epochs of one loss over a fixed dataset for one policy (SFT or DPO)."""

    policy: Policy
    items: Sequence[Sample | PairSample]
    epochs: int
    batch_size: int
    loss: LossConfig
    rng: random.Random  # shuffles each epoch; a local RNG, never the trainer's global one


def train_epochs(jobs: Mapping[str, TrainJob]) -> dict[str, list[list[dict[str, float]]]]:
    """Run every job: each epoch trains one optimiser step per `batch_size` items of a shuffled
    copy. The jobs advance in lockstep: step i of every policy is dispatched before any is awaited,
    so the engine may train them at the same time (`learner.concurrent`). Returns name -> per
    epoch, each step's train metrics."""
    steps: dict[str, list[tuple[int, list]]] = {}  # name -> (epoch, batch) in training order
    for name, job in jobs.items():
        steps[name] = []
        for epoch in range(job.epochs):
            order = list(job.items)
            job.rng.shuffle(order)
            steps[name] += [(epoch, batch) for batch in chunks(order, job.batch_size)]
    out: dict[str, list[list[dict[str, float]]]] = {name: [[] for _ in range(job.epochs)] for name, job in jobs.items()}
    for k in range(max((len(v) for v in steps.values()), default=0)):
        pending = {name: (steps[name][k][0], jobs[name].policy.train_async(steps[name][k][1], jobs[name].loss))
                   for name in jobs if k < len(steps[name])}
        for name, (epoch, p) in pending.items():
            out[name][epoch].append(p.result())
    return out


def sampling(rollout: RolloutConfig, n: int = 1, temperature: Optional[float] = None,
             seed: Optional[int] = None, stop: Optional[list[str]] = None) -> SamplingConfig:
    """A SamplingConfig from the run's `rollout.*`. At temperature 0 (greedy) top_p is irrelevant,
    so it is set to 1.0 (backends then take the argmax on every path)."""
    temperature = rollout.temperature if temperature is None else temperature
    return SamplingConfig(n=n, temperature=temperature, top_p=rollout.top_p if temperature > 0 else 1.0,
                          max_tokens=rollout.max_new_tokens, seed=seed, stop=stop)


def group_episodes(episodes: Iterable[Episode]) -> dict[str, list[Episode]]:
    """Episodes by `Episode.group` (the G samples of one prompt), groups in order of first appearance."""
    groups: dict[str, list[Episode]] = {}
    for ep in episodes:
        groups.setdefault(ep.group, []).append(ep)
    return groups


def group_samples(episodes: Iterable[Episode], std_normalize: bool = False) -> list[Sample]:
    """Single-turn credit: one Sample per episode (its first turn), A = R - mean of its group
    (divided by the group's std with `std_normalize`); samples in group order."""
    samples = []
    for eps in group_episodes(episodes).values():
        for ep, a in zip(eps, group_advantages([e.reward for e in eps], std_normalize=std_normalize)):
            t = ep.turns[0]
            samples.append(Sample(t.prompt_ids, t.completion_ids, advantage=a, behavior_logprobs=t.logprobs or None))
    return samples


def reward_metrics(episodes: Sequence[Episode]) -> dict[str, float]:
    """The standard metrics block of a step: reward/mean, reward/max, reward/<component> (means
    over episodes), groups/mixed (share of groups of 2+ episodes whose rewards differ: the groups
    that carry a group-relative gradient; absent without such groups) and tokens/completion_mean
    (over the distinct turns)."""
    rewards = [e.reward for e in episodes if e.reward is not None]
    out: dict[str, float] = {"reward/mean": mean(rewards), "reward/max": max(rewards) if rewards else float("nan")}
    for k in (episodes[0].components if episodes else {}):
        out[f"reward/{k}"] = mean(e.components.get(k, 0.0) for e in episodes)
    multi = [g for g in group_episodes(episodes).values() if len(g) > 1]
    if multi:
        out["groups/mixed"] = mean(len({e.reward for e in g}) > 1 for g in multi)
    turns = {t.id: t for e in episodes for t in e.turns}
    if turns:
        out["tokens/completion_mean"] = mean(len(t.completion_ids) for t in turns.values())
    return out


def score_outcomes(scores: Sequence[Reward], prefix: str = "") -> dict[str, list[float]]:
    """Per-task outcomes of scored outputs: `<prefix>reward` (the totals) and `<prefix><component>`
    for each reward component (e.g. math's `correct` and `format`)."""
    out = {f"{prefix}reward": [float(s.total) for s in scores]}
    for k in (scores[0].components if scores else {}):
        out[f"{prefix}{k}"] = [float(s.components.get(k, 0.0)) for s in scores]
    return out


def score_metrics(scores: Sequence[Reward]) -> dict[str, float]:
    """Evaluation block of scored outputs without intervals: "reward" (mean total) and each
    component's mean."""
    return {k: mean(v) for k, v in score_outcomes(scores).items()}


def is_binary(values: Sequence[float]) -> bool:
    """All outcomes are 0 or 1 (a success rate: accuracy, pass rate)."""
    return all(v in (0.0, 1.0) for v in values)


def outcome_metrics(outcomes: Mapping[str, Sequence[float]],
                    diffs: Iterable[tuple[str, str]] = ()) -> dict[str, float]:
    """The evaluation block with 95% intervals, from per-task outcomes.

    `outcomes`: metric -> one outcome per evaluated task (the same task order for every metric
    scored on the same tasks). Each metric gives its mean and `<metric>/ci_low`, `/ci_high`, `/n`:
    a Wilson interval when every outcome is 0 or 1 (a success rate), else a Student t interval.
    `diffs`: (a, b) pairs of metrics scored on the same tasks; each pair whose metrics are both
    in `outcomes` gives the paired difference `diff/<a>-<b>` (mean of a[i] - b[i]) with its
    paired t interval; where both also have lenient versions (`lenient/<a>`, `lenient/<b>`:
    `reading_outcomes`), their difference too. Metrics with no outcomes are left out."""
    out: dict[str, float] = {}
    for key, values in outcomes.items():
        xs = [float(v) for v in values]
        if xs:
            iv = wilson_interval(int(sum(xs)), len(xs)) if is_binary(xs) else mean_interval(xs)
            out.update(interval_metrics(key, iv))
    for a, b in diffs:
        for x, y in ((a, b), (f"{LENIENT}/{a}", f"{LENIENT}/{b}")):
            if outcomes.get(x) and outcomes.get(y):
                out.update(interval_metrics(diff_key(x, y), paired_difference(outcomes[x], outcomes[y])))
    return out


def vote(env: Env, texts: Sequence[str]) -> Optional[int]:
    """`majority_index` over the answers `env` extracts from `texts`, compared with `env.answers_equal`."""
    return majority_index([env.extract_answer(t or "") for t in texts], env.answers_equal)
