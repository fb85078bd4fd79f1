"""Shared base for envs whose tasks have one verifiable final answer (math, multiple choice,
reasoning-gym): the task's question and answer-format instruction, its chat messages, answer
extraction, a correctness reward with an optional format component, and majority voting.

An answer env knows tasks, not protocols: it has one role, ``single`` (solve alone; with
``feedback`` and ``previous``: a multi-turn revision of the agent's own previous output).
Multi-agent protocols write their own role prompts (in their algorithm files) from the hooks `question_text`, `instruction` and `messages` (`Algorithm.answer_prompt`).

`reward(task, outputs)` scores the one answer in `outputs` (the protocol passes its final answer).
Components: ``correct`` (`grade` of the answer `extract_for` reads: 0/1, reasoning-gym's scorer may
give partial credit) and ``format`` (0/1: exactly one non-empty ``<answer>...</answer>`` block at
the end of the text); total = correct + format_weight * format.

Readings of a reply (what evaluations save and report, algorithms/base.py `keep_replies`):
  strict   `extract_for(task, text)`, the answer the reward scores; None: the reply has no
           readable answer (reported as `noanswer/<metric>`);
  lenient  `lenient_for(task, text)`: the strict reading, else the env's forgiving reading
           (`lenient_answer`; math: math-verify on the whole reply, else its last number; multiple
           choice: the last standalone option label). It is never a reward: evaluations report its correctness next
           to the strict one (`lenient/<metric>`) to show how much of a score is the answer format.
"""
from __future__ import annotations

import re
import threading
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any, Optional

from envs.base import Env, EnvConfig, Reward, fill
from marl_llm.config import ConfigError, check, check_positive

DEFAULT_PROMPTS: dict[str, str] = {
    "single": "{question}\n\nSolve the problem step by step. {answer_instruction}",
    "feedback": "\n\nYour previous response:\n{previous}\n\nHere is the feedback:\n{feedback}\n\nRevise your response.",
}


@dataclass
class AnswerEnvConfig(EnvConfig):
    system_prompt: Optional[str] = (
        "You are a careful problem solver. Reason step by step, then give the final answer "
        "inside <answer></answer> tags.")
    #: weight of the format component (a well-formed <answer> block); 0 turns it off
    format_weight: float = 0.0
    #: what every answering prompt asks for at its end
    answer_instruction: str = "End your reply with the final answer in the form <answer>ANSWER</answer>."
    #: prompt templates (`single`, `feedback`); override single keys, e.g. env.prompts.single="..."
    prompts: dict[str, str] = field(default_factory=lambda: dict(DEFAULT_PROMPTS))
    #: answering replies end at the answer block's closing tag (see AnswerEnv.stop)
    stop_at_answer: bool = True
    #: worked examples before every prompt: the first `few_shot` train tasks, each as an earlier
    #: user turn (the `single` prompt) and an assistant turn (`few_shot_reply`); 0: none
    few_shot: int = 0
    #: an example's reply, filled from its task's fields: {answer}, {question}, {metadata[key]}
    few_shot_reply: str = "<answer>{answer}</answer>"

    def __post_init__(self):
        super().__post_init__()
        check_positive("env.format_weight", self.format_weight, allow_zero=True)
        check_positive("env.few_shot", self.few_shot, allow_zero=True)
        unknown = sorted(set(self.prompts or {}) - set(DEFAULT_PROMPTS))
        check(not unknown, "env.prompts", sorted(self.prompts), f"has keys {unknown}; an answer env's templates are "
              f"{list(DEFAULT_PROMPTS)} (a protocol's role prompts are algo.prompts)")


# ---- text helpers -------------------------------------------------------------------------------
_TAG_RE = {}


def tag_contents(text: str, tag: str = "answer") -> list[str]:
    """Contents of every complete <tag>...</tag> block, in order."""
    if tag not in _TAG_RE:
        _TAG_RE[tag] = re.compile(rf"<{tag}>(.*?)</{tag}>", re.S | re.I)
    return [m.strip() for m in _TAG_RE[tag].findall(text or "")]


def well_formed_answer(text: str, tag: str = "answer") -> bool:
    """Exactly one non-empty <answer>...</answer> block, with nothing but whitespace after it."""
    text = text or ""
    blocks = tag_contents(text, tag)
    if len(blocks) != 1 or not blocks[0]:
        return False
    if len(re.findall(rf"<{tag}>", text, re.I)) != 1 or len(re.findall(rf"</{tag}>", text, re.I)) != 1:
        return False
    return text.rstrip().lower().endswith(f"</{tag}>")


def last_boxed(text: str) -> Optional[str]:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, else None."""
    text = text or ""
    idx = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if idx < 0:
        return None
    i = text.find("{", idx)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[idx:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1:j].strip()
    return None


_NUM_RE = re.compile(r"-?\d[\d,]*(?:\.\d+)?|-?\.\d+")


def is_number(text: str) -> bool:
    """Whether `text` (stripped) is one number as `last_number` reads them."""
    return _NUM_RE.fullmatch((text or "").strip()) is not None


def last_number(text: str) -> Optional[str]:
    nums = _NUM_RE.findall(text or "")
    return nums[-1].rstrip(".,") if nums else None


#: words that announce a final answer in free text ("The answer is 7", "Final answer: 7",
#: "The final number ... is 7"); `cued_number` reads the first number after one
ANSWER_CUE = re.compile(r"\b(?:answer|final\s+number|final\s+result)\b", re.I)


def cued_number(text: str) -> Optional[str]:
    """The first number after the first answer cue (ANSWER_CUE) that has one on the rest of its
    line, else None. Reading the FIRST cued answer makes extraction a function of the text up to
    that answer: what a model writes after answering (small models ramble on into new numbers)
    cannot change it, so a longer length cap can never turn a right answer wrong."""
    text = text or ""
    for m in ANSWER_CUE.finditer(text):
        end = text.find("\n", m.end())
        nums = _NUM_RE.findall(text[m.end(): len(text) if end < 0 else end])
        if nums:
            return nums[0].rstrip(".,")
    return None


def extract_final(text: str) -> Optional[str]:
    """The final answer: last <answer> block (a \\boxed{} inside it wins), else the last \\boxed{},
    else the text after the last `#### `; None if there is none of these."""
    blocks = tag_contents(text, "answer")
    if blocks:
        b = last_boxed(blocks[-1])
        return (b if b is not None else blocks[-1]).strip()
    b = last_boxed(text)
    if b is not None:
        return b
    m = re.findall(r"####\s*([^\n]+)", text or "")
    if m:
        return m[-1].strip()
    return None


# ---- numeric / math equivalence -----------------------------------------------------------------
_PLAIN_NUM = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)?(?:\.\d+)?")


def as_number(s: Optional[str]) -> Optional[Fraction]:
    """A plain number ("1,234", "-3.5", "$18", "7/2", "50%") as a Fraction, else None."""
    if s is None:
        return None
    t = s.strip().replace("\\$", "").replace("$", "").replace("\\!", "").replace("{,}", ",").strip()
    t = re.sub(r"^\\text\{(.*)\}$", r"\1", t).strip()
    t = t.rstrip(".").strip()
    if t.endswith("\\%") or t.endswith("%"):
        t = t.rstrip("%").rstrip("\\").strip()
    if not t:
        return None
    m = re.fullmatch(r"([-+]?\d+)\s*/\s*(\d+)", t)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    if _PLAIN_NUM.fullmatch(t) and any(c.isdigit() for c in t):
        try:
            return Fraction(t.replace(",", ""))
        except (ValueError, ZeroDivisionError):
            return None
    return None


def _in_main_thread() -> bool:
    """math-verify times out with signals, which work in the main thread only: elsewhere its
    timeouts are turned off."""
    return threading.current_thread() is threading.main_thread()


def _mv_parse(s: str):
    from math_verify import parse

    kw = {} if _in_main_thread() else {"parsing_timeout": None}
    wrapped = s if "$" in s or "\\(" in s or "\\[" in s else f"${s}$"
    out = parse(wrapped, **kw)
    if not out:
        out = parse(s, **kw)
    return out


def math_equal(pred: Optional[str], gold: Optional[str]) -> bool:
    """Equivalence of two final answers: exact for plain numbers, else the `math-verify` package."""
    if pred is None or gold is None:
        return False
    pred, gold = pred.strip(), gold.strip()
    if not pred or not gold:
        return False
    p, g = as_number(pred), as_number(gold)
    if p is not None and g is not None:
        return p == g or abs(float(p) - float(g)) <= 1e-9 * max(1.0, abs(float(g)))
    if pred == gold:
        return True
    try:
        from math_verify import verify

        kw = {} if _in_main_thread() else {"timeout_seconds": None}
        gp, pp = _mv_parse(gold), _mv_parse(pred)
        if not gp or not pp:
            return False
        return bool(verify(gp, pp, **kw))
    except Exception:  # noqa: BLE001 - an unparseable answer is a wrong answer
        return False


def verify_reading(text: str) -> Optional[str]:
    """The answer math-verify reads in a whole text (the last number or LaTeX expression it can
    parse: "3 + 5 = 8" reads "8"), else None (nothing parseable, or math-verify failed)."""
    from math_verify import parse

    try:
        found = parse(text or "", **({} if _in_main_thread() else {"parsing_timeout": None}))
    except Exception:  # noqa: BLE001 - a reply math-verify cannot read has no answer for it
        return None
    reading = str(found[1]).strip() if len(found) > 1 else ""  # parse gives [expression, the text it read]
    return reading or None


#: the env methods an answer env's readings and grade go through (`reads_answers`)
ANSWER_HOOKS = ("extract_for", "lenient_for", "grade")


def reads_answers(env) -> bool:
    """Whether `env` scores one extracted final answer (an AnswerEnv, also behind an
    `env.reward_fn` wrapper, which forwards these methods)."""
    return all(callable(getattr(env, h, None)) for h in ANSWER_HOOKS)


class AnswerEnv(Env):
    """Base for single-answer tasks. Subclasses load tasks and define `question_text`, `gold`,
    `extract_answer` / `extract_for` (optional), `lenient_answer` / `lenient_for` (optional),
    `answers_equal` (optional) and `grade` (optional)."""

    Config = AnswerEnvConfig
    roles = ("single",)
    joint_roles = ("single",)

    def __init__(self, cfg: AnswerEnvConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.max_reward = 1.0 + float(cfg.format_weight)

    # ---- per-task hooks -----------------------------------------------------------------------
    def question_text(self, task: dict[str, Any]) -> str:
        return str(task["question"])

    def gold(self, task: dict[str, Any]) -> str:
        return str(task["answer"])

    def instruction(self, task: dict[str, Any]) -> str:
        """The answer-format instruction that ends every answering prompt."""
        return self.cfg.answer_instruction

    def extract_answer(self, text: str) -> Optional[str]:
        return extract_final(text)

    def stop(self, role: str) -> list[str]:
        """An answer ends at ``</answer>`` when the answer instruction asks for that block
        (`env.stop_at_answer`, default on). Small models answer and then ramble on into new
        numbers until the length cap: the ramble costs generation and training time, and what it
        adds can only confuse the answer. (A protocol's non-answering role, e.g. one that quotes
        solutions, passes its own stop strings.)"""
        if self.cfg.stop_at_answer and "</answer>" in self.cfg.answer_instruction:
            return ["</answer>"]
        return []

    def answers_equal(self, a: Optional[str], b: Optional[str]) -> bool:
        """Whether two extracted answers are the same answer (used for gold checks and voting)."""
        if a is None or b is None:
            return False
        return a.strip() == b.strip()

    # ---- prompts ------------------------------------------------------------------------------
    def _template(self, key: str) -> str:
        prompts = self.cfg.prompts or {}
        return prompts.get(key) or DEFAULT_PROMPTS[key]

    def messages(self, user: str) -> list[dict[str, str]]:
        """Chat messages of one user turn: the env's system prompt (if any), the worked examples
        (`env.few_shot`), then `user`."""
        msgs = []
        if self.cfg.system_prompt:
            msgs.append({"role": "system", "content": self.cfg.system_prompt})
        msgs.extend(self.examples())
        msgs.append({"role": "user", "content": user})
        return msgs

    def examples(self) -> list[dict[str, str]]:
        """The `env.few_shot` worked examples as chat turns, the same in every prompt (train, dev,
        test; the trained and the untrained model alike). They are the first train tasks: dev and
        test never hold one, so no evaluated task is shown solved. Small models copy a shown reply
        format far more readily than an instruction (docs/RESULTS.md: reasoning-gym)."""
        if "_examples" not in self.__dict__:
            turns = []
            tasks = self.tasks("train")[:self.cfg.few_shot] if self.cfg.few_shot else []
            if len(tasks) < self.cfg.few_shot:
                raise ConfigError(f"env.few_shot={self.cfg.few_shot} is more than the {len(tasks)} train tasks")
            for t in tasks:
                user = fill(self._template("single"), question=self.question_text(t),
                            answer_instruction=self.instruction(t))
                turns += [{"role": "user", "content": user},
                          {"role": "assistant", "content": self.example_reply(t)}]
            self._examples = turns
        return self._examples

    def example_reply(self, task: dict[str, Any]) -> str:
        """`env.few_shot_reply` filled from `task`'s fields (a field the task lacks is an error)."""
        values = {**task, "answer": self.gold(task), "question": self.question_text(task)}
        try:
            return self.cfg.few_shot_reply.format_map(values)
        except (KeyError, IndexError, TypeError, ValueError) as e:
            raise ConfigError(f"env.few_shot_reply={self.cfg.few_shot_reply!r} cannot be filled from task "
                              f"{task.get('id')!r} ({type(e).__name__}: {e}); its fields: {sorted(values)}"
                              + (f", metadata keys {sorted(task['metadata'])}" if isinstance(task.get("metadata"), dict)
                                 else "")) from None

    def prompt(self, task, role: str = "single", **context) -> list[dict[str, str]]:
        if role not in self.roles:
            raise ValueError(f"{type(self).__name__} has no role {role!r}; roles: {list(self.roles)} "
                             "(a protocol's own roles build their prompts with Algorithm.answer_prompt)")
        user = fill(self._template("single"), question=self.question_text(task),
                    answer_instruction=self.instruction(task))
        if context.get("feedback"):
            user += fill(self._template("feedback"), previous=(context.get("previous") or "(none)"),
                         feedback=context["feedback"])
        return self.messages(user)

    # ---- scoring ------------------------------------------------------------------------------
    def extract_for(self, task, text: str) -> Optional[str]:
        """The answer the reward scores for `task` (the strict reading; None: no readable answer).
        Default `extract_answer`; an env whose reading depends on the task (multiple choice: its
        option labels) overrides this."""
        return self.extract_answer(text or "")

    def lenient_for(self, task, text: str) -> Optional[str]:
        """The lenient reading for `task` (evaluation diagnostics, never a reward): the strict
        reading, else the env's forgiving `lenient_answer`."""
        strict = self.extract_for(task, text)
        return strict if strict is not None else self.lenient_answer(text or "")

    def grade(self, task, answer: Optional[str]) -> float:
        """The ``correct`` component of an extracted answer: 1.0 iff it is the gold answer
        (`answers_equal`); reasoning-gym grades with its own scorer."""
        return float(self.answers_equal(answer, self.gold(task)))

    def is_correct(self, task, text: str) -> bool:
        return self.grade(task, self.extract_for(task, text)) >= 1.0

    def score(self, task, text: str) -> Reward:
        """The reward of one output text (any role's final answer)."""
        pred = self.extract_for(task, text)
        correct = self.grade(task, pred)
        fmt = float(well_formed_answer(text or ""))
        total = correct + float(self.cfg.format_weight) * fmt
        return Reward(total, {"correct": correct, "format": fmt}, info={"pred": pred, "gold": self.gold(task)})

    def reward(self, task, outputs: dict[str, str]) -> Reward:
        if len(outputs) != 1:
            raise ValueError(f"{type(self).__name__} scores one final answer; got outputs of {sorted(outputs)} "
                             "(a protocol passes its final answer, e.g. {'single': text})")
        return self.score(task, next(iter(outputs.values())) or "")

    def reference_answer_text(self, task) -> str:
        return f"<answer>{self.gold(task)}</answer>"

    def reference_outputs(self, task):
        return {"single": self.reference_answer_text(task)}
