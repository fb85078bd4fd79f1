"""Multiple-choice envs on small local fixtures: loading, letter extraction, exact-match reward."""
from pathlib import Path

import pytest

from envs.base import SPLITS, make_env
from envs.multiple_choice import extract_letter, extract_text_answer, normalise_answer, normalise_choices

DATA = Path(__file__).resolve().parents[1] / "data"


@pytest.mark.parametrize("text,want", [
    ("The answer is (B).", "B"),
    ("the answer is C because ...", "C"),
    ("Answer: D", "D"),
    ("I think B) is right", "B"),
    ("<answer>B</answer>", "B"),
    ("<answer>(C)</answer>", "C"),
    ("<answer>C. refrigerator</answer>", "C"),
    ("B", "B"),
    ("(A)", "A"),
    ("A.", "A"),
    ("Reasoning about (A) and (B)... so <answer>D</answer>", "D"),
    ("First (A) looks wrong; the answer is (C)", "C"),
    ("A dog would not fit here.", None),
    ("no idea", None),
    ("<answer>F</answer>", None),  # not one of A-E
])
def test_extract_letter(text, want):
    assert extract_letter(text, "ABCDE") == want


def test_extract_letter_by_option_text():
    choices = [["A", "cupboard"], ["B", "refrigerator"]]
    assert extract_letter("<answer>refrigerator</answer>", "AB", choices) == "B"


def test_extract_text_answer():
    assert extract_text_answer("so it is <answer>False</answer>") == "False"
    assert extract_text_answer("Thus the answer is True.") == "True"
    assert extract_text_answer("work\nTrue") == "True"


def test_normalise_answer_forms():
    ch = normalise_choices(["x", "y", "z"])
    assert ch == [["A", "x"], ["B", "y"], ["C", "z"]]
    assert normalise_answer(2, ch) == ("C", "letter")
    assert normalise_answer("B", ch) == ("B", "letter")
    assert normalise_answer("(A)", []) == ("A", "letter")
    assert normalise_answer("True", []) == ("True", "text")
    assert normalise_answer("valid", []) == ("valid", "text")
    assert normalise_choices({"label": ["A", "B"], "text": ["p", "q"]}) == [["A", "p"], ["B", "q"]]


@pytest.mark.parametrize("name,file,n", [("mmlu", "mmlu.jsonl", 8), ("csqa", "csqa.jsonl", 6), ("bbh", "bbh.jsonl", 5),
                                         ("bbh", "bbh_boolean.jsonl", 4)])
def test_reference_full_marks_and_options_shown(name, file, n):
    env = make_env({"name": name, "data": {"path": str(DATA / file), "eval_size": 1}})
    tasks = [t for s in SPLITS for t in env.tasks(s)]
    assert len(tasks) == n
    assert all(env.reward(t, env.reference_outputs(t)).total == 1.0 for t in tasks)
    for t in tasks:  # every prompt shows the options (or the options are inside the question)
        content = env.prompt(t, "single")[-1]["content"]
        assert ("(A)" in content) or t["mode"] == "text"


def test_mc_reward_and_prompt():
    env = make_env({"name": "csqa", "data": {"path": str(DATA / "csqa.jsonl"), "eval_size": 1}})
    t = next(t for s in SPLITS for t in env.tasks(s) if t["id"] == "c1")
    assert t["answer"] == "B" and t["mode"] == "letter"
    p = env.prompt(t, "single")[-1]["content"]
    assert "(B) refrigerator" in p and "<answer>X</answer>" in p
    assert env.reward(t, {"single": "The answer is (B)."}).components == {"correct": 1.0, "format": 0.0}
    assert env.reward(t, {"single": "<answer>A</answer>"}).components == {"correct": 0.0, "format": 1.0}
    assert env.majority_vote(["<answer>B</answer>", "The answer is (B)", "<answer>C</answer>"]) == "B"


def test_bbh_text_mode_exact_match():
    env = make_env({"name": "bbh", "data": {"path": str(DATA / "bbh_boolean.jsonl"), "eval_size": 1}})
    t = [t for s in SPLITS for t in env.tasks(s) if t["answer"] == "False"][0]
    assert t["mode"] == "text"
    assert "<answer>ANSWER</answer>" in env.prompt(t, "single")[-1]["content"]
    assert env.reward(t, {"single": "<answer>false</answer>"}).total == 1.0
    assert env.reward(t, {"single": "<answer>True</answer>"}).total == 0.0


def test_bbh_letter_mode_uses_options_in_input():
    env = make_env({"name": "bbh", "data": {"path": str(DATA / "bbh.jsonl"), "eval_size": 1}})
    t = [t for s in SPLITS for t in env.tasks(s) if t["answer"] == "C"][0]
    assert t["mode"] == "letter" and t["choices"] == []
    assert env.reward(t, {"single": "So the answer is (C)."}).total == 1.0
    assert env.reward(t, {"single": "<answer>(E)</answer>"}).total == 0.0  # E is not an option here
