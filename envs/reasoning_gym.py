"""Procedural reasoning tasks from the `reasoning-gym` package: offline, seeded, verifiable.

``env=reasoning_gym env.task=<name>`` picks any of the package's ~100 generators (gsm_symbolic,
basic_arithmetic, countdown, ...); ``env.task_config`` passes generator settings (e.g.
``+env.task_config.min_terms=2``). Train and eval (test) sets come from different seeds, and train
drops any question that also appears in eval, so they never overlap; the dev split is carved out of
the ``env.train_size`` train tasks (``env.dev_size``, envs/base.py). The reward's ``correct``
component is reasoning-gym's own scorer on the extracted answer (`grade`: partial credit where the
scorer gives it), plus ``format_weight`` x ``format`` (see envs/qa.py for roles and context).
The answer is the last ``<answer>`` block, else the last ``\\boxed{}``, else the reply's last line
(only an empty reply has no answer). The lenient reading (envs/qa.py "Readings of a reply"), for
tasks with a numeric gold answer and a reply with neither tags nor a box, is the reply's last number
instead of its last line ("4 + 0 = 4. The answer is 4." reads 4, which the scorer accepts, where the
last line scores as a wrong answer): both are scored by reasoning-gym's own scorer.
"""
from __future__ import annotations

import functools
import json
import logging
from dataclasses import dataclass, field
from typing import Any, Optional

from envs.qa import AnswerEnv, AnswerEnvConfig, is_number, last_boxed, last_number, tag_contents
from envs.multiple_choice import norm_text
from marl_llm.config import ConfigError, check, check_positive
from marl_llm.registry import register_env

log = logging.getLogger(__name__)
_EVAL_SEED_OFFSET = 1_000_003


def rg_task_names() -> list[str]:
    from reasoning_gym.factory import DATASETS

    return sorted(DATASETS)


@dataclass
class ReasoningGymConfig(AnswerEnvConfig):
    name: str = "reasoning_gym"
    task: str = "basic_arithmetic"
    task_config: dict[str, Any] = field(default_factory=dict)
    train_size: int = 1000
    eval_size: int = 100
    answer_instruction: str = "Give only the final answer inside <answer></answer> tags at the end of your reply."

    def __post_init__(self):
        super().__post_init__()
        names = rg_task_names()
        check(self.task in names, "env.task", self.task, f"is not a reasoning-gym dataset; choose one of {names}")
        check_positive("env.train_size", self.train_size, allow_zero=True)
        check_positive("env.eval_size", self.eval_size, allow_zero=True)


def _jsonable(v: Any) -> Any:
    return json.loads(json.dumps(v, default=str))


def strict_reading(text: str) -> Optional[str]:
    """The last <answer> block, else the last box, else the last non-empty line; None if empty."""
    blocks = tag_contents(text or "", "answer")
    if blocks:
        return blocks[-1]
    b = last_boxed(text or "")
    if b is not None:
        return b
    lines = [l.strip() for l in (text or "").strip().splitlines() if l.strip()]
    return lines[-1] if lines else None


def lenient_reading(text: str, gold: str) -> Optional[str]:
    """The strict reading, except that a reply without tags or a box, on a task whose gold answer
    is a number, reads as its last number (module docstring)."""
    text = text or ""
    if is_number(gold) and not tag_contents(text, "answer") and last_boxed(text) is None:
        return last_number(text) or strict_reading(text)
    return strict_reading(text)


def lenient_correct(task: dict[str, Any], outputs: dict[str, str]) -> float:
    """A reward for `env.reward_fn` (envs/reward_fn.py): reasoning-gym's own scorer on the lenient
    reading of the one reply, for a model that does not write the answer tags yet (SmolLM2-135M
    almost never does: docs/RESULTS.md). With `[env, envs.reasoning_gym:lenient_correct]` and
    weights `[0, 1]` the run trains on it while `correct` (the strict reading) is still reported."""
    text = next(iter(outputs.values()), "") or ""
    answer = lenient_reading(text, str(task.get("answer", "")))
    if answer is None:
        return 0.0
    entry = {"question": task["question"], "answer": task["answer"], "metadata": task.get("metadata", {})}
    return _scored(_score_fn(task["rg_task"]), answer, entry)


lenient_correct.max_reward = 1.0


def _scored(score_answer, answer: str, entry: dict[str, Any]) -> float:
    """A reasoning-gym scorer's grade of `answer`; a scorer crash on odd output scores 0."""
    try:
        return float(score_answer(answer=answer, entry=entry))
    except Exception as e:  # noqa: BLE001 - logged, scored 0
        log.debug("reasoning-gym scorer failed on %r: %s", answer, e)
        return 0.0


@functools.lru_cache(maxsize=None)
def _score_fn(name: str):
    import reasoning_gym

    return reasoning_gym.get_score_answer_fn(name)


@register_env("reasoning_gym")
class ReasoningGymEnv(AnswerEnv):
    Config = ReasoningGymConfig

    def __init__(self, cfg: ReasoningGymConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self._entries: dict[str, dict[str, Any]] = {}
        self._scorer = None

    def _dataset(self, size: int, seed: int):
        import reasoning_gym

        try:
            return reasoning_gym.create_dataset(self.cfg.task, size=max(size, 1), seed=seed, **self.cfg.task_config)
        except (TypeError, ValueError, AssertionError) as e:
            raise ConfigError(f"reasoning-gym task {self.cfg.task!r} rejected env.task_config="
                              f"{dict(self.cfg.task_config)}: {type(e).__name__}: {e}") from None

    def _load(self):
        c = self.cfg
        ev_ds = self._dataset(c.eval_size, self.seed + _EVAL_SEED_OFFSET)
        self._scorer = ev_ds
        ev = [self._task(ev_ds[i], "eval", i) for i in range(c.eval_size)]
        seen = {t["question"] for t in ev}
        # extra rows cover the ones dropped for overlapping with eval
        tr_ds = self._dataset(c.train_size + c.eval_size, self.seed)
        train = []
        for i in range(len(tr_ds)):
            if len(train) >= c.train_size:
                break
            e = tr_ds[i]
            if e["question"] in seen:
                continue
            train.append(self._task(e, "train", i))
        if len(train) < c.train_size:
            log.warning("reasoning-gym %s: only %d train tasks are distinct from eval (asked %d)",
                        c.task, len(train), c.train_size)
        return train, ev

    def task_key(self, task: dict[str, Any]) -> str:
        """The question: a train task repeating a dev or test question is dropped (envs/base.py)."""
        return task["question"]

    def _task(self, entry: dict[str, Any], split: str, i: int) -> dict[str, Any]:
        tid = f"rg-{self.cfg.task}-s{self.seed}-{split}-{i}"
        self._entries[tid] = entry
        return {"id": tid, "question": entry["question"], "answer": "" if entry.get("answer") is None else str(entry["answer"]),
                "metadata": _jsonable(entry.get("metadata", {})), "rg_task": self.cfg.task}

    def extract_answer(self, text: str) -> Optional[str]:
        return strict_reading(text)

    def lenient_for(self, task, text: str) -> Optional[str]:
        return lenient_reading(text, str(task.get("answer", "")))

    def answers_equal(self, a, b) -> bool:
        return a is not None and b is not None and norm_text(a) == norm_text(b)

    def grade(self, task, answer: Optional[str]) -> float:
        """reasoning-gym's own scorer of `answer` (partial credit where it gives it)."""
        if answer is None:
            return 0.0
        if self._scorer is None:
            self._scorer = self._dataset(1, self.seed + _EVAL_SEED_OFFSET)
        entry = self._entries.get(task["id"]) or {"question": task["question"], "answer": task["answer"],
                                                   "metadata": task.get("metadata", {})}
        return _scored(self._scorer.score_answer, answer, entry)
