"""The strict and the lenient reading of a reply on the answer envs (envs/qa.py "Readings of a
reply"): the strict reading is what the reward scores; the lenient one is an evaluation diagnostic."""
from __future__ import annotations

import pytest

from envs.base import make_env
from envs.math import MathConfig, MathEnv
from envs.multiple_choice import MultipleChoiceConfig, MultipleChoiceEnv, last_label
from envs.qa import reads_answers, verify_reading


def math_env() -> MathEnv:
    return MathEnv(MathConfig(source="generator", train_size=1, eval_size=1))


@pytest.mark.parametrize("text, strict, lenient", [
    ("3 + 5 = 8", None, "8"),                       # no cue, no tags: math-verify reads the result
    ("Answer: 3 + 5 = 8", "3", "3"),                # the strict reading (first number after the cue) stands
    ("The answer is 6.", "6", "6"),
    ("so the total is \\boxed{12} apples", "12", "12"),
    ("<answer>7</answer> and then 9 more", "7", "7"),
    ("I do not know.", None, None),
    ("The total is #7", None, "7"),                 # math-verify reads nothing: the last number
    ("so x = \\frac{1}{2}", None, "\\frac{1}{2}"),  # LaTeX, as competition_math answers are
    ("The final number in the form <answer>N</answer> is", None, None),  # the instruction's placeholder
])
def test_math_strict_and_lenient_readings(text, strict, lenient):
    env = math_env()
    assert env.extract_answer(text) == strict
    assert env.lenient_answer(text) == lenient


def test_math_lenient_correctness_uses_the_envs_equivalence_and_never_the_reward():
    env = math_env()
    task = {"id": "t", "question": "How many?", "answer": "8"}
    assert env.reward(task, {"single": "3 + 5 = 8"}).components["correct"] == 0.0  # no answer for the reward
    assert env.extract_for(task, "3 + 5 = 8") is None
    assert env.grade(task, env.lenient_for(task, "3 + 5 = 8")) == 1.0
    assert env.grade(task, env.lenient_for(task, "we get 8.0")) == 1.0          # math_equal: 8.0 is 8
    assert env.grade(task, env.lenient_for(task, "Answer: 3 + 5 = 8")) == 0.0  # strict "3" is kept
    half = {"id": "h", "question": "?", "answer": "1/2"}
    assert env.grade(half, env.lenient_for(half, "so x = \\frac{1}{2}")) == 1.0


def test_verify_reading_returns_the_text_math_verify_read():
    assert verify_reading("12 apples, then 13 $") == "13"
    assert verify_reading("") is None and verify_reading("no numbers") is None


def mc_env() -> MultipleChoiceEnv:
    return MultipleChoiceEnv(MultipleChoiceConfig(name="multiple_choice"))


LETTER_TASK = {"id": "m", "question": "Which?", "choices": [["A", "cat"], ["B", "dog"], ["C", "cow"], ["D", "hen"]],
               "answer": "B", "mode": "letter"}


@pytest.mark.parametrize("text, strict, lenient", [
    ("I'd go with B since it barks", None, "B"),        # a bare letter: only the lenient reading takes it
    ("A cat cannot bark, so B", None, "B"),             # the last standalone label
    ("The answer is (C).", "C", "C"),
    ("<answer>dog</answer>", "B", "B"),                 # an option's text
    ("Both are animals.", None, None),                  # no label stands alone ("Both" is a word)
])
def test_multiple_choice_readings(text, strict, lenient):
    env = mc_env()
    assert env.extract_for(LETTER_TASK, text) == strict
    assert env.lenient_for(LETTER_TASK, text) == lenient


def test_multiple_choice_lenient_label_is_one_of_the_tasks_labels_and_text_answers_stay_strict():
    assert last_label("E is not an option, A is", "ABCD") == "A"
    env = mc_env()
    text_task = {"id": "b", "question": "True or False?", "choices": [], "answer": "True", "mode": "text"}
    reply = "Let me think.\nTrue"
    assert env.lenient_for(text_task, reply) == env.extract_for(text_task, reply) == "True"
    assert env.grade(LETTER_TASK, env.lenient_for(LETTER_TASK, "I'd go with B since it barks")) == 1.0
    assert env.reward(LETTER_TASK, {"single": "I'd go with B since it barks"}).components["correct"] == 0.0


def test_reasoning_gym_lenient_reading_takes_the_last_number_of_untagged_replies():
    env = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 2, "eval_size": 2})
    task = env.tasks("test")[0]
    gold = task["answer"]
    assert gold.lstrip("-").isdigit()
    # tags or a box: both readings are the tagged answer, even when a later number disagrees
    for text in (f"<answer>{gold}</answer> 99", f"\\boxed{{{gold}}} or 99"):
        assert env.lenient_for(task, text) == env.extract_for(task, text) == gold
    # free text: strict reads the last line (scored as a wrong answer), lenient its last number
    text = f"1 + 1 = {gold}\nThe answer is {gold}."
    assert env.extract_for(task, text) == f"The answer is {gold}."
    assert env.lenient_for(task, text) == gold
    assert env.grade(task, env.lenient_for(task, text)) == 1.0 > env.grade(task, env.extract_for(task, text))
    assert env.lenient_for(task, "no number here") == env.extract_for(task, "no number here") == "no number here"
    assert env.extract_for(task, "") is None and env.lenient_for(task, "") is None
    ref = env.reference_outputs(task)["single"]
    assert env.grade(task, env.extract_for(task, ref)) == 1.0 == env.reward(task, {"single": ref}).total
    # a task whose gold answer is not a number: lenient stays the strict reading
    words = make_env({"name": "reasoning_gym", "task": "spell_backward", "train_size": 2, "eval_size": 2})
    wtask = words.tasks("test")[0]
    assert words.lenient_for(wtask, "step 1\nolleh") == words.extract_for(wtask, "step 1\nolleh") == "olleh"


def test_only_answer_envs_read_answers():
    assert reads_answers(math_env()) and reads_answers(mc_env())
    assert not reads_answers(make_env({"name": "toy"}))


def test_reasoning_gym_lenient_reward_trains_on_the_lenient_reading_and_reports_the_strict_one():
    env = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 2, "eval_size": 2,
                    "reward_fn": ["env", "envs.reasoning_gym:lenient_correct"], "reward_weights": [0.0, 1.0]})
    task = env.tasks("test")[0]
    gold = task["answer"]
    r = env.reward(task, {"single": f"1 + 1 = {gold}\nThe answer is {gold}."})
    assert r.total == 1.0 == r.components["lenient_correct"]
    assert r.components["correct"] < 1.0  # the strict reading (the last line), still reported
    wrong = env.reward(task, {"single": "The answer is 100000."})
    assert wrong.total == 0.0 and env.max_reward == 1.0
    assert env.reward(task, {"single": f"<answer>{gold}</answer>"}).total == 1.0
