"""Multiple-choice and exact-match QA: ``mmlu``, ``csqa`` (CommonsenseQA) and ``bbh`` (BIG-Bench Hard).

A task is normalised to ``question``, ``choices`` ([[label, text], ...]; empty when the options
are inside the question, as in BBH) and ``answer``: a letter for option tasks, else free text
(BBH's exact-match targets such as "True", "valid", "24"). The dataset's answer may be an index
(MMLU), a letter (CSQA's answerKey) or "(B)" (BBH). Reward: exact match of the extracted letter
(or normalised text) with the gold answer; components ``correct`` and ``format`` (see envs/qa.py).

Letter extraction, first match wins: the last ``<answer>`` block (a letter, "(B)", "B)" or an
option's text), "answer is (B)" / "Answer: B", the last "(B)" or "B)", a reply that is only a letter.
Lenient reading (evaluation diagnostics only, envs/qa.py "Readings of a reply"): the letter above,
else the last standalone option label of the task ("I'd go with B since ..." reads B); a free-text
answer's reading already falls back to the reply's last line, so there the lenient reading is the strict one.
"""
from __future__ import annotations

import re
import string
from dataclasses import dataclass, field
from typing import Any, Optional

from envs.base import DataConfig
from envs.qa import AnswerEnv, AnswerEnvConfig, tag_contents
from marl_llm.data import load_splits
from marl_llm.registry import register_env

LETTERS = string.ascii_uppercase


@dataclass
class MultipleChoiceConfig(AnswerEnvConfig):
    name: str = "multiple_choice"
    data: DataConfig = field(default_factory=lambda: DataConfig(fields={"question": "question", "answer": "answer",
                                                                         "choices": "choices"}))
    answer_instruction: str = "End your reply with the letter of the correct option in the form <answer>X</answer>."
    #: for tasks whose gold answer is free text (e.g. BBH boolean_expressions)
    text_answer_instruction: str = "End your reply with the final answer in the form <answer>ANSWER</answer>."


def _mmlu_data():
    return DataConfig(hub_id="cais/mmlu", hub_config="all", split="auxiliary_train", eval_split="test",
                      fields={"question": "question", "choices": "choices", "answer": "answer"})


def _csqa_data():
    return DataConfig(hub_id="tau/commonsense_qa", split="train", eval_split="validation",
                      fields={"question": "question", "choices": "choices", "answer": "answerKey"})


def _bbh_data():
    return DataConfig(hub_id="lukaemon/bbh", hub_config="date_understanding", split="test", eval_split=None,
                      eval_size=50, fields={"question": "input", "answer": "target"})


@dataclass
class MMLUConfig(MultipleChoiceConfig):
    name: str = "mmlu"
    data: DataConfig = field(default_factory=_mmlu_data)


@dataclass
class CSQAConfig(MultipleChoiceConfig):
    name: str = "csqa"
    data: DataConfig = field(default_factory=_csqa_data)


@dataclass
class BBHConfig(MultipleChoiceConfig):
    name: str = "bbh"
    data: DataConfig = field(default_factory=_bbh_data)
    answer_instruction: str = ("End your reply with the letter of the correct option in the form "
                               "<answer>(X)</answer>.")


# ---- normalisation --------------------------------------------------------------------------------
def normalise_choices(raw: Any) -> list[list[str]]:
    if raw is None:
        return []
    if isinstance(raw, dict):  # CSQA: {"label": [...], "text": [...]}
        labels, texts = raw.get("label") or [], raw.get("text") or []
        return [[str(l).strip(), str(t)] for l, t in zip(labels, texts)]
    if isinstance(raw, (list, tuple)):
        out = []
        for i, c in enumerate(raw):
            if isinstance(c, (list, tuple)) and len(c) == 2:
                out.append([str(c[0]).strip(), str(c[1])])
            else:
                out.append([LETTERS[i], str(c)])
        return out
    raise ValueError(f"cannot read answer choices of type {type(raw).__name__}: {raw!r}")


_PAREN_LETTER = re.compile(r"^\(?\s*([A-Z])\s*\)?\.?$")


def normalise_answer(raw: Any, choices: list[list[str]]) -> tuple[str, str]:
    """(answer, mode): mode 'letter' (answer is a label) or 'text' (exact match on normalised text)."""
    labels = [c[0] for c in choices]
    if isinstance(raw, bool):
        return str(raw), "text"
    if isinstance(raw, int) and choices:
        if not 0 <= raw < len(choices):
            raise ValueError(f"answer index {raw} out of range for {len(choices)} choices")
        return labels[raw], "letter"
    s = str(raw).strip()
    m = _PAREN_LETTER.match(s)
    if m and (not labels or m.group(1) in labels) and (labels or s.startswith("(")):
        return m.group(1), "letter"
    if choices and s.isdigit() and 0 <= int(s) < len(choices) and s not in labels:
        return labels[int(s)], "letter"
    for lab, text in choices:  # the answer given as the option's text
        if norm_text(text) == norm_text(s):
            return lab, "letter"
    return s, "text"


def norm_text(s: Optional[str]) -> str:
    if s is None:
        return ""
    t = s.strip().lower()
    t = re.sub(r"\s+", " ", t)
    t = t.strip(" .!\"'`*")
    if t.startswith("(") and t.endswith(")"):
        t = t[1:-1].strip()
    return t


# ---- extraction -----------------------------------------------------------------------------------
def extract_letter(text: str, labels: str = "ABCDE", choices: Optional[list[list[str]]] = None) -> Optional[str]:
    text = text or ""
    L = "".join(sorted(set(labels))) or "ABCDE"
    cls = f"[{re.escape(L)}]"

    def from_span(s: str) -> Optional[str]:
        s = s.strip().strip("*").strip()
        for lab, t in choices or []:
            if norm_text(t) and norm_text(t) == norm_text(s):
                return lab
        m = re.fullmatch(rf"(?:option\s+|choice\s+)?\(?\s*({cls})\s*\)?[.:]?(?:\s.*)?", s, re.S | re.I)
        if m and (m.group(1).isupper() or len(s) <= 3):
            return m.group(1).upper()
        m = re.search(rf"\(({cls})\)", s)
        return m.group(1) if m else None

    blocks = tag_contents(text, "answer")
    if blocks:
        got = from_span(blocks[-1])
        if got:
            return got
    hits = re.findall(rf"answer\s*(?:is|:)?\s*(?:option\s+)?[:\s]*\(?\s*({cls})\s*\)?(?![A-Za-z])", text, re.I)
    hits = [h for h in hits if h.isupper()]
    if hits:
        return hits[-1]
    hits = re.findall(rf"\(({cls})\)|(?<![A-Za-z])({cls})\)", text)
    if hits:
        a, b = hits[-1]
        return a or b
    m = re.fullmatch(rf"\s*\(?({cls})\)?[.:]?\s*", text)
    if m:
        return m.group(1)
    return None


def last_label(text: str, labels: str) -> Optional[str]:
    """The last of `labels` standing alone in `text` (an upper-case letter not inside a word), else None."""
    hits = re.findall(rf"(?<![A-Za-z])([{re.escape(labels)}])(?![A-Za-z])", text or "") if labels else []
    return hits[-1] if hits else None


def extract_text_answer(text: str) -> Optional[str]:
    text = text or ""
    blocks = tag_contents(text, "answer")
    if blocks:
        return blocks[-1]
    m = re.findall(r"answer is[:\s]*([^\n]+?)\s*(?:\.\s|\.$|\n|$)", text, re.I)
    if m:
        return m[-1].strip()
    lines = [l.strip() for l in text.strip().splitlines() if l.strip()]
    return lines[-1] if lines else None


class MultipleChoiceEnv(AnswerEnv):
    Config = MultipleChoiceConfig
    columns = ("question", "answer")  # and `choices` unless the question lists them

    def _load(self):
        c = self.cfg
        splits = load_splits(c.data, default_fields={k: k for k in self.columns},
                             required=self.columns, seed=self.seed, id_prefix=c.name)
        return [self._normalise(t) for t in splits.train], [self._normalise(t) for t in splits.eval]

    def _normalise(self, t: dict[str, Any]) -> dict[str, Any]:
        t = dict(t)
        choices = normalise_choices(t.get("choices"))
        ans, mode = normalise_answer(t["answer"], choices)
        t["choices"], t["answer"], t["mode"] = choices, ans, mode
        return t

    def question_text(self, task) -> str:
        q = str(task["question"]).strip()
        if task.get("choices"):
            q += "\n\nOptions:\n" + "\n".join(f"({lab}) {text}" for lab, text in task["choices"])
        return q

    def instruction(self, task) -> str:
        return self.cfg.answer_instruction if task.get("mode", "letter") == "letter" else self.cfg.text_answer_instruction

    def _labels(self, task) -> str:
        if task.get("choices"):
            return "".join(c[0] for c in task["choices"])
        found = re.findall(r"^\s*\(([A-Z])\)", str(task.get("question", "")), re.M)  # BBH options in the input
        return "".join(found) or LETTERS[:5]

    def extract_for(self, task, text: str) -> Optional[str]:
        if task.get("mode", "letter") == "letter":
            return extract_letter(text, self._labels(task), task.get("choices"))
        return extract_text_answer(text)

    def extract_answer(self, text: str) -> Optional[str]:
        """Task-free extraction (for voting): a letter if one is found, else the final text."""
        return extract_letter(text, LETTERS) or extract_text_answer(text)

    def lenient_for(self, task, text: str) -> Optional[str]:
        """The strict reading, else (option tasks) the last standalone option label of the task."""
        strict = self.extract_for(task, text)
        if strict is not None or task.get("mode", "letter") != "letter":
            return strict
        return last_label(text, self._labels(task))

    def answers_equal(self, a, b) -> bool:
        if a is None or b is None:
            return False
        return norm_text(a) == norm_text(b)

    def reference_answer_text(self, task) -> str:
        if task.get("mode") == "letter" and task.get("choices"):
            text = dict((lab, t) for lab, t in task["choices"]).get(task["answer"], "")
            return f"The correct option is ({task['answer']}) {text}.\n<answer>{task['answer']}</answer>"
        if task.get("mode") == "letter":
            return f"<answer>({task['answer']})</answer>"
        return f"<answer>{task['answer']}</answer>"


register_env("multiple_choice")(MultipleChoiceEnv)


@register_env("mmlu")
class MMLUEnv(MultipleChoiceEnv):
    Config = MMLUConfig


@register_env("csqa")
class CSQAEnv(MultipleChoiceEnv):
    Config = CSQAConfig


@register_env("bbh")
class BBHEnv(MultipleChoiceEnv):
    Config = BBHConfig
