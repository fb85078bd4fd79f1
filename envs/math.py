"""Math word problems with verifiable answers.

Sources (`env.source`):
- ``generator`` — built-in, offline, seeded grade-school arithmetic word problems (+, -, x) with
  integer answers. ``env.difficulty`` d gives d-digit operands (1: 2..9, 2: 10..99, ...);
  ``env.train_size`` (train and dev) / ``env.eval_size`` (test) set the split sizes. Eval (test)
  problems are drawn first, from
  their own seeded stream, and train problems (another stream) never reuse an eval problem's
  (template, operands) nor its question text, so the splits never overlap.
- ``dataset`` — GSM8K format (``question``, ``answer`` ending in ``#### N``) from
  ``env.data.path`` or ``env.data.hub_id`` (e.g. openai/gsm8k, config main); a plain answer column
  or a ``\\boxed{}`` solution works too (see ``env.answer_format``).
- ``auto`` (default) — ``dataset`` when ``env.data.path`` or ``env.data.hub_id`` is set, else ``generator``.

With either source, a training task whose question text (case and spacing aside) is also a dev or
test question is dropped (logged; `task_key`, envs/base.py): the held-out splits are never trained
on, even where a dataset repeats a problem across its splits. The dev
split is carved out of the train tasks (``env.dev_size``; envs/base.py), so ``env.train_size``
counts both.

Reward: ``correct`` (math-verify equivalence, exact fast path for plain numbers) plus
``format_weight`` x ``format`` (a well-formed final ``<answer>`` block; default weight 0.0, the
MLPO paper's optional small format reward is e.g. 0.1). Roles and context: see envs/qa.py.

Answer extraction (`MathEnv.extract_answer`), in this order:
  1. the explicit format: the last ``<answer>...</answer>`` block (a ``\\boxed{}`` inside it wins),
     else the last ``\\boxed{}``, else the text after the last ``#### ``; copies of the answer
     instruction's own example block (``<answer>N</answer>``: small models repeat the instruction,
     "The final number in the form <answer>N</answer> is 7") are not answers and are skipped;
  2. free text: the first number after the first answer cue ("answer", "final number", "final
     result", any case) that has a number on the rest of its line ("The answer is 7.",
     "Final answer: 7");
  3. else no answer (scored wrong).
There is no last-number fallback: a model that answers and then rambles on into new numbers (as
SmolLM2-135M does) would be scored on whatever number the length cap happens to cut at, so the
accuracy would depend on `rollout.max_new_tokens` (the untrained model's greedy accuracy fell
when the cap went from 96 to 128 tokens). With the rules above a longer cap can only
add an answer that was not reached yet, never change one that was given.

Lenient reading (`MathEnv.lenient_answer`; evaluation diagnostics only, never the reward: the
`lenient/<metric>` outcomes, envs/qa.py "Readings of a reply"): the strict reading above; where it
finds nothing, what math-verify reads in the whole reply (the last number or LaTeX expression it
can parse, as lenient graders do: "3 + 5 = 8" reads 8); where math-verify reads nothing (broken
LaTeX, "#7"), the last number. The last-number dependence on the length cap described above is
exactly why this is a diagnostic and not the score.
"""
from __future__ import annotations

import random
import re
from dataclasses import dataclass, field
from typing import Any, Optional

from envs.base import DataConfig
from envs.qa import (AnswerEnv, AnswerEnvConfig, cued_number, extract_final, last_boxed, last_number, math_equal,
                      verify_reading)
from marl_llm.config import ConfigError, check_choice, check_positive, check_range
from marl_llm.data import load_splits
from marl_llm.registry import register_env


def _gsm8k_data() -> DataConfig:
    return DataConfig(hub_config="main", split="train", eval_split="test",
                      fields={"question": "question", "answer": "answer"})


@dataclass
class MathConfig(AnswerEnvConfig):
    name: str = "math"
    data: DataConfig = field(default_factory=_gsm8k_data)
    source: str = "auto"
    difficulty: int = 1
    train_size: int = 2000
    eval_size: int = 200
    #: how the dataset's answer column is read: gsm8k ("... #### N"), boxed (last \boxed{}),
    #: plain (the column is the answer) or auto (gsm8k if "####" is present, else boxed, else plain)
    answer_format: str = "auto"
    answer_instruction: str = "End your reply with the final number in the form <answer>N</answer>."

    def __post_init__(self):
        super().__post_init__()
        check_choice("env.source", self.source, ("auto", "generator", "dataset"))
        check_choice("env.answer_format", self.answer_format, ("auto", "gsm8k", "boxed", "plain"))
        check_range("env.difficulty", self.difficulty, 1, 6, note="operand digits")
        check_positive("env.train_size", self.train_size, allow_zero=True)
        check_positive("env.eval_size", self.eval_size, allow_zero=True)


# ---- the built-in generator ----------------------------------------------------------------------
_NAMES = [("Ava", "she"), ("Ben", "he"), ("Chloe", "she"), ("Daniel", "he"), ("Emma", "she"), ("Finn", "he"),
          ("Grace", "she"), ("Hugo", "he"), ("Isla", "she"), ("Jack", "he"), ("Lena", "she"), ("Max", "he"),
          ("Mia", "she"), ("Noah", "he"), ("Olivia", "she"), ("Sam", "he"), ("Tara", "she"), ("Leo", "he")]
_ITEMS = ["apples", "marbles", "stickers", "pencils", "cookies", "books", "stamps", "shells", "cards",
          "balloons", "oranges", "coins", "buttons", "crayons", "toy cars"]

# (operation, template); {n} name, {p} pronoun (capitalised where it starts a sentence), {i} items
_TEMPLATES = [
    ("+", "{n} has {a} {i}. {P} gets {b} more {i}. How many {i} does {n} have now?"),
    ("+", "{n} collected {a} {i} in the morning and {b} {i} in the afternoon. How many {i} did {n} collect in total?"),
    ("+", "There are {a} {i} in a box and {b} {i} on the table. How many {i} are there altogether?"),
    ("-", "{n} had {a} {i} and gave {b} of them to a friend. How many {i} does {n} have left?"),
    ("-", "A shop had {a} {i}. It sold {b} of them. How many {i} does the shop have now?"),
    ("-", "{n} wants {a} {i} and already has {b}. How many more {i} does {n} need?"),
    ("x", "{n} buys {a} bags with {b} {i} in each bag. How many {i} does {n} buy?"),
    ("x", "There are {a} rows of {i} with {b} {i} in each row. How many {i} are there?"),
    ("x", "{n} gets {b} {i} every day for {a} days. How many {i} does {n} get in all?"),
]


def operand_range(difficulty: int) -> tuple[int, int]:
    lo = 10 ** (difficulty - 1)
    return max(2, lo), 10 ** difficulty - 1


def _make_problem(rng: random.Random, difficulty: int) -> tuple[tuple, dict[str, Any]]:
    t = rng.randrange(len(_TEMPLATES))
    op, text = _TEMPLATES[t]
    lo, hi = operand_range(difficulty)
    a, b = rng.randint(lo, hi), rng.randint(lo, hi)
    if op == "-":
        if a == b:
            b = lo if a != lo else hi
        a, b = max(a, b), min(a, b)
    name, pron = rng.choice(_NAMES)
    item = rng.choice(_ITEMS)
    q = text.format(n=name, P=pron.capitalize(), p=pron, i=item, a=a, b=b)
    c = a + b if op == "+" else a - b if op == "-" else a * b
    sym = "\u00d7" if op == "x" else op
    key = (t, a, b)
    return key, {"question": q, "answer": str(c), "op": op, "operands": [a, b], "template": t, "difficulty": difficulty,
                 "solution": f"{a} {sym} {b} = {c}."}


def generate_problems(seed: int, difficulty: int, train_size: int, eval_size: int):
    """(train, eval) arithmetic word problems; eval first, train never reuses an eval problem."""
    rng_eval = random.Random(f"marl_llm-math-eval-{seed}-{difficulty}")
    eval_keys: set = set()
    ev = []
    attempts = 0
    while len(ev) < eval_size:
        attempts += 1
        if attempts > 50 * (eval_size + 10):
            raise ConfigError(f"env.eval_size={eval_size} is too large for difficulty {difficulty}: "
                              f"only {len(ev)} distinct problems found")
        key, p = _make_problem(rng_eval, difficulty)
        if key in eval_keys:
            continue
        eval_keys.add(key)
        p["id"] = f"arith-d{difficulty}-s{seed}-eval-{len(ev)}"
        ev.append(p)
    rng_train = random.Random(f"marl_llm-math-train-{seed}-{difficulty}")
    eval_questions = {question_key(p) for p in ev}
    train = []
    while len(train) < train_size:
        key, p = _make_problem(rng_train, difficulty)
        if key in eval_keys or question_key(p) in eval_questions:
            continue
        p["id"] = f"arith-d{difficulty}-s{seed}-train-{len(train)}"
        train.append(p)
    return train, ev


def question_key(task: dict[str, Any]) -> str:
    """A task's question text with case and spacing normalised (what "the same problem" means)."""
    return " ".join(str(task["question"]).lower().split())


# ---- the env --------------------------------------------------------------------------------------
def gsm8k_gold(answer: str) -> str:
    return answer.split("####")[-1].strip().replace(",", "").rstrip(".")


@register_env("math")
class MathEnv(AnswerEnv):
    Config = MathConfig
    columns = ("question", "answer")

    def _load(self):
        c = self.cfg
        if not self.uses_dataset():
            train, ev = generate_problems(self.seed, c.difficulty, c.train_size, c.eval_size)
        else:
            splits = load_splits(c.data, default_fields={k: k for k in self.columns},
                                 required=self.columns, seed=self.seed, id_prefix=c.name)
            train, ev = [self._normalise(t) for t in splits.train], [self._normalise(t) for t in splits.eval]
        return train, ev

    def task_key(self, task: dict[str, Any]) -> str:
        return question_key(task)

    def _normalise(self, t: dict[str, Any]) -> dict[str, Any]:
        raw = "" if t.get("answer") is None else str(t["answer"])
        fmt = self.cfg.answer_format
        if fmt == "auto":
            fmt = "gsm8k" if "####" in raw else "boxed" if last_boxed(raw) is not None else "plain"
        if fmt == "gsm8k":
            gold, solution = gsm8k_gold(raw), raw
        elif fmt == "boxed":
            gold, solution = last_boxed(raw), raw
            if gold is None:
                raise ValueError(f"task {t.get('id')!r}: answer has no \\boxed{{}} (env.answer_format=boxed): {raw[:200]!r}")
        else:
            gold, solution = raw.strip(), t.get("solution")
        t = dict(t)
        t["answer"] = gold
        if solution is not None:
            t["solution"] = solution
        return t

    def extract_answer(self, text: str) -> Optional[str]:
        """The final answer of a reply, in this order (see "Answer extraction" in the module docstring):
        the explicit format (`extract_final`: the last <answer> block, else the last \\boxed{}, else
        `#### N`), with copies of the instruction's own placeholder (`<answer>N</answer>`) ignored;
        else the first number after an answer cue (`cued_number`); else None."""
        text = self._without_placeholder(text or "")
        a = extract_final(text)
        return a if a is not None else cued_number(text)

    def lenient_answer(self, text: str) -> Optional[str]:
        """The strict reading (`extract_answer`), else math-verify's reading of the whole reply,
        else its last number (see "Lenient reading" in the module docstring)."""
        strict = self.extract_answer(text)
        if strict is not None:
            return strict
        text = self._without_placeholder(text or "")
        found = verify_reading(text)
        return found if found is not None else last_number(text)

    def _without_placeholder(self, text: str) -> str:
        """`text` without copies of the answer instruction's example block (e.g. "The final number in
        the form <answer>N</answer> is 7": the model repeats the instruction; "N" is no answer)."""
        for block in re.findall(r"<answer>.*?</answer>", self.cfg.answer_instruction, re.S | re.I):
            text = text.replace(block, " ")
        return text

    def answers_equal(self, a, b) -> bool:
        return math_equal(a, b)

    def reference_answer_text(self, task) -> str:
        sol = task.get("solution") or ""
        sol = re.sub(r"<<[^>]*>>", "", sol.split("####")[0]).strip()  # GSM8K calculator annotations
        return (sol + "\n" if sol else "") + f"<answer>{task['answer']}</answer>"
