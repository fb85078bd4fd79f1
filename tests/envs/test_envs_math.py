"""Data loading, the arithmetic generator, math answer extraction/equivalence and the math rewards."""
import json
from pathlib import Path

import pytest

from envs.base import SPLITS, DataConfig, make_env
from envs.math import generate_problems, operand_range
from envs.qa import as_number, extract_final, last_boxed, math_equal, well_formed_answer
from marl_llm.config import ConfigError
from marl_llm.data import DataError, load_splits

DATA = Path(__file__).resolve().parents[1] / "data"
GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"


# ---- marl_llm.data ---------------------------------------------------------------------------------
def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_missing_path_names_it(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_splits(DataConfig(path=str(missing)))


def test_wrong_field_names_name_the_columns(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"q": "1+1?", "a": "2"}] * 4)
    with pytest.raises(DataError) as e:
        load_splits(DataConfig(path=p, eval_size=1), default_fields={"question": "question", "answer": "answer"},
                    required=("question", "answer"))
    msg = str(e.value)
    assert "'question'" in msg and "['q', 'a']" in msg and "env.data.fields" in msg
    # the mapping fixes it
    s = load_splits(DataConfig(path=p, eval_size=1, fields={"question": "q", "answer": "a"}),
                    default_fields={"question": "question", "answer": "answer"}, required=("question", "answer"))
    assert s.train[0]["question"] == "1+1?" and s.train[0]["answer"] == "2"


def test_offline_hub_error_says_pass_path():
    with pytest.raises(DataError, match=r"env\.data\.path="):
        load_splits(DataConfig(hub_id="openai/gsm8k", hub_config="main"))


def test_no_source_is_an_error():
    with pytest.raises(DataError, match="env.data.path"):
        load_splits(DataConfig())


def test_holdout_is_seeded_disjoint_and_limited(tmp_path):
    p = _write_jsonl(tmp_path / "d.jsonl", [{"question": f"q{i}", "answer": str(i)} for i in range(50)])
    a = load_splits(DataConfig(path=p, eval_size=10), seed=1)
    b = load_splits(DataConfig(path=p, eval_size=10), seed=1)
    c = load_splits(DataConfig(path=p, eval_size=10), seed=2)
    assert [t["id"] for t in a.eval] == [t["id"] for t in b.eval]
    assert [t["id"] for t in a.eval] != [t["id"] for t in c.eval]
    assert len(a.train) == 40 and len(a.eval) == 10
    assert not {t["question"] for t in a.train} & {t["question"] for t in a.eval}
    lim = load_splits(DataConfig(path=p, eval_size=10, limit=3), seed=1)
    assert len(lim.train) == 3 and len(lim.eval) == 3


def test_folder_with_named_splits_uses_eval_split(tmp_path):
    d = tmp_path / "ds"
    d.mkdir()
    _write_jsonl(d / "train.jsonl", [{"question": f"t{i}", "answer": "1"} for i in range(6)])
    _write_jsonl(d / "test.jsonl", [{"question": f"e{i}", "answer": "1"} for i in range(3)])
    s = load_splits(DataConfig(path=str(d), eval_split="test"))
    assert len(s.train) == 6 and [t["question"] for t in s.eval] == ["e0", "e1", "e2"]
    assert not {t["id"] for t in s.train} & {t["id"] for t in s.eval}


# ---- the generator ------------------------------------------------------------------------------
def test_generator_is_seeded():
    a = generate_problems(0, 1, 50, 20)
    b = generate_problems(0, 1, 50, 20)
    c = generate_problems(1, 1, 50, 20)
    assert a == b
    assert a != c


def test_generator_train_eval_never_overlap():
    train, ev = generate_problems(3, 1, 3000, 150)
    key = lambda t: (t["template"], tuple(t["operands"]))  # noqa: E731
    assert not {key(t) for t in train} & {key(t) for t in ev}
    assert not {t["question"] for t in train} & {t["question"] for t in ev}
    assert len({key(t) for t in ev}) == 150
    assert not {t["id"] for t in train} & {t["id"] for t in ev}


@pytest.mark.parametrize("d", [1, 2, 3])
def test_difficulty_sets_operand_digits(d):
    train, ev = generate_problems(0, d, 300, 30)
    lo, hi = operand_range(d)
    ops = [x for t in train + ev for x in t["operands"]]
    assert all(lo <= x <= hi for x in ops)
    assert all(len(str(x)) == d for x in ops)
    for t in train[:50]:
        a, b = t["operands"]
        want = {"+": a + b, "-": a - b, "x": a * b}[t["op"]]
        assert t["answer"] == str(want) and want >= 0
    assert {t["op"] for t in train} == {"+", "-", "x"}


def test_math_env_generator_defaults_and_sizes():
    env = make_env({"name": "math", "train_size": 40, "eval_size": 10, "difficulty": 2})
    # train_size counts train and dev (env.dev_size=100, capped at a fifth)
    assert [len(env.tasks(s)) for s in SPLITS] == [32, 8, 10]
    assert all(len(str(x)) == 2 for t in env.train_tasks() for x in t["operands"])
    with pytest.raises(ConfigError, match="difficulty"):
        make_env({"name": "math", "difficulty": 0})


# ---- extraction and equivalence -----------------------------------------------------------------------
@pytest.mark.parametrize("text,want", [
    ("so 3 + 4 = 7. <answer>7</answer>", "7"),
    ("<answer>5</answer> wait, no <answer> 8 </answer>", "8"),
    ("The result is \\boxed{\\frac{1}{2}}.", "\\frac{1}{2}"),
    ("<answer>\\boxed{12}</answer>", "12"),
    ("Natalia sold 72 clips.\n#### 72", "72"),
    ("\\boxed{x^{2}+1}", "x^{2}+1"),
    ("no final answer here", None),
])
def test_extract_final(text, want):
    assert extract_final(text) == want


def test_math_env_reads_free_text_after_an_answer_cue_not_the_last_number():
    env = make_env({"name": "math", "train_size": 1, "eval_size": 1})
    assert env.extract_answer("3 + 4 = 7, so the answer is 7 apples.") == "7"
    assert env.extract_answer("Final answer: it costs $1,250.") == "1,250"
    # no explicit format and no cue: no answer (a last-number fallback would score whatever number
    # the length cap happens to cut at)
    assert env.extract_answer("3 + 4 = 7, so she has 7 apples.") is None


def test_last_boxed_nested():
    assert last_boxed("a \\boxed{1} b \\boxed{\\frac{2}{\\sqrt{3}}}") == "\\frac{2}{\\sqrt{3}}"


@pytest.mark.parametrize("a,b,eq", [
    ("0.5", "\\frac{1}{2}", True),
    ("\\frac{3}{4}", "0.75", True),
    ("1,000", "1000", True),
    ("$18", "18", True),
    ("72.0", "72", True),
    ("7/8", "\\frac{7}{8}", True),
    ("\\dfrac{3}{8}", "\\frac{3}{8}", True),
    ("x = 6", "6", True),
    ("2, 3", "3, 2", True),
    ("\\sqrt{2}", "\\sqrt{2}", True),
    ("3", "4", False),
    ("\\frac{1}{3}", "0.5", False),
    (None, "4", False),
    ("", "4", False),
])
def test_math_equal(a, b, eq):
    assert math_equal(a, b) is eq


def test_as_number_fast_path():
    assert as_number("1,234") == 1234 and as_number("-3.5") == -3.5 and as_number("7/2") == 3.5
    assert as_number("x+1") is None and as_number("1,2") is None


def test_well_formed_answer():
    assert well_formed_answer("work... <answer>7</answer>")
    assert well_formed_answer("<answer>7</answer>\n")
    assert not well_formed_answer("<answer>7</answer> and more text")
    assert not well_formed_answer("<answer></answer>")
    assert not well_formed_answer("<answer>1</answer><answer>7</answer>")
    assert not well_formed_answer("the answer is 7")


# ---- rewards ----------------------------------------------------------------------------------------
def test_math_reward_components_and_format_weight():
    env = make_env({"name": "math", "train_size": 2, "eval_size": 1, "format_weight": 0.1})
    task = {"id": "t", "question": "2+2?", "answer": "4"}
    assert env.max_reward == pytest.approx(1.1)
    r = env.reward(task, {"single": "2 + 2 = 4 <answer>4</answer>"})
    assert r.total == pytest.approx(1.1) and r.components == {"correct": 1.0, "format": 1.0}
    r = env.reward(task, {"single": "2 + 2 = 4, the answer is 4"})  # right (answer cue) but no tag
    assert r.total == pytest.approx(1.0) and r.components == {"correct": 1.0, "format": 0.0}
    r = env.reward(task, {"single": "<answer>5</answer>"})
    assert r.total == pytest.approx(0.1) and r.components == {"correct": 0.0, "format": 1.0}
    # one final answer, whoever wrote it: a protocol picks its own (MALT's refiner, MLPO's leader)
    assert env.reward(task, {"refiner": "<answer>4</answer>"}).components["correct"] == 1.0
    with pytest.raises(ValueError, match=r"scores one final answer; got outputs of \['leader', 'team'\]"):
        env.reward(task, {"team": "<answer>3</answer>", "leader": "<answer>4</answer>"})


def test_majority_vote_groups_equivalent_answers():
    env = make_env({"name": "competition_math", "data": {"path": str(DATA / "competition_math.jsonl")}})
    texts = ["<answer>0.5</answer>", "<answer>\\frac{1}{2}</answer>", "<answer>3</answer>", "nothing"]
    assert env.majority_vote(texts) == "0.5"
    assert env.majority_vote(["no", "answers"]) is None


def test_prompts_know_the_task_not_the_protocols():
    env = make_env({"name": "math", "train_size": 2, "eval_size": 1})
    task = env.train_tasks()[0]
    q = task["question"]
    single = env.prompt(task, "single")
    assert single[0]["role"] == "system" and q in single[-1]["content"] and "<answer>" in single[-1]["content"]
    assert single == env.messages(f"{q}\n\nSolve the problem step by step. {env.instruction(task)}")
    fb = env.prompt(task, "single", previous="old", feedback="wrong sign")[-1]["content"]
    assert "Here is the feedback" in fb and "wrong sign" in fb
    for role in ("leader", "team", "verifier", "refiner", "agent7"):  # protocols' roles are the algorithms'
        with pytest.raises(ValueError, match="roles"):
            env.prompt(task, role)


def test_prompt_templates_are_config():
    env = make_env({"name": "math", "train_size": 2, "eval_size": 1, "system_prompt": None,
                    "prompts": {"single": "Q: {question} ({answer_instruction})"}})
    msgs = env.prompt(env.train_tasks()[0], "single")
    assert len(msgs) == 1 and msgs[0]["content"].startswith("Q: ")
    with pytest.raises(ConfigError, match=r"env.prompts.*has keys \['leader'\].*algo.prompts"):
        make_env({"name": "math", "prompts": {"leader": "x"}})


def test_a_long_context_is_cut_to_fit_also_in_a_protocol_prompt(tiny_model_path, caplog):
    from transformers import AutoTokenizer

    env = make_env({"name": "math", "train_size": 2, "eval_size": 1})
    tok = AutoTokenizer.from_pretrained(tiny_model_path)
    env.fit_prompts(tok, 120)
    task = env.train_tasks()[0]
    build = lambda **c: env.messages(f"{task['question']}\n{c['answer']}")  # noqa: E731
    msgs = env.fit_context(build, task, "critic", {"answer": "blah " * 400})
    assert msgs[-1]["content"].endswith(" [...]") and "context of role 'critic'" in caplog.text


@pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")
def test_gsm8k_file_gold_and_shuffled():
    env = make_env({"name": "math", "data": {"path": str(GSM8K), "limit": 30}, "dev_size": 0})
    tasks = env.train_tasks()
    assert len(tasks) == 30 and tasks[0]["answer"] == "72"
    assert all(env.reward(t, env.reference_outputs(t)).total == 1.0 for t in tasks)
    wrong = [env.reward(t, env.reference_outputs(tasks[(i + 1) % len(tasks)])).total for i, t in enumerate(tasks)]
    assert sum(wrong) / len(wrong) < 0.1


def test_competition_math_fixture():
    env = make_env({"name": "competition_math", "data": {"path": str(DATA / "competition_math.jsonl"), "eval_size": 2}})
    tasks = [t for s in SPLITS for t in env.tasks(s)]
    assert len(tasks) == 8 and len(env.tasks("test")) == 2
    golds = {t["answer"] for t in tasks}
    assert "\\frac{7}{8}" in golds and "\\sqrt{2}" in golds
    assert all(env.reward(t, env.reference_outputs(t)).total == 1.0 for t in tasks)
    t = next(t for t in tasks if t["answer"] == "\\frac{7}{8}")
    assert env.reward(t, {"single": "<answer>0.875</answer>"}).total == 1.0
    assert env.reward(t, {"single": "so \\boxed{7/8}"}).total == 1.0
    assert env.reward(t, {"single": "<answer>\\frac{8}{7}</answer>"}).total == 0.0


def test_competition_math_offline_default_asks_for_path():
    env = make_env({"name": "competition_math"})
    with pytest.raises(DataError, match="env.data.path"):
        env.train_tasks()


def test_folder_subset_is_hub_config(tmp_path):
    (tmp_path / "algebra").mkdir()
    (tmp_path / "geometry").mkdir()
    _write_jsonl(tmp_path / "algebra" / "train.jsonl", [{"question": f"a{i}", "answer": "1"} for i in range(4)])
    _write_jsonl(tmp_path / "geometry" / "train.jsonl", [{"question": f"g{i}", "answer": "1"} for i in range(4)])
    s = load_splits(DataConfig(path=str(tmp_path), hub_config="geometry", eval_size=1))
    assert {t["question"][0] for t in s.train + s.eval} == {"g"}


# ---- held-out split and answer extraction (issue 11) --------------------------------------------------
def test_generator_eval_questions_never_in_train_for_several_seeds():
    for seed, d in ((0, 1), (7, 1), (3, 2)):
        train, ev = generate_problems(seed, d, 2000, 200)
        assert len(ev) == 200 and len(train) == 2000
        assert not {" ".join(t["question"].lower().split()) for t in train} & \
            {" ".join(t["question"].lower().split()) for t in ev}


def test_dataset_train_tasks_repeating_an_eval_question_are_dropped(tmp_path):
    rows = [{"question": f"What is {i} + {i}?", "answer": str(2 * i)} for i in range(20)]
    # each problem appears twice (once with other spacing and case): the held-out copies must
    # take their twins out of the training split
    rows += [{"question": f"what is  {i} + {i}? ", "answer": str(2 * i)} for i in range(20)]
    path = _write_jsonl(tmp_path / "dup.jsonl", rows)
    env = make_env({"name": "math", "data": {"path": path, "eval_size": 8}})
    norm = lambda t: " ".join(t["question"].lower().split())  # noqa: E731
    dev, test = ({norm(t) for t in env.tasks(s)} for s in ("dev", "test"))
    assert len(env.tasks("test")) == 8 and len(env.tasks("dev")) >= 4  # a fifth of the train tasks left
    assert not {norm(t) for t in env.train_tasks()} & (dev | test) and not dev & test
    # every row is in one split, or is the twin of a dev or test task and was dropped from train
    # (unless both copies were held out)
    twins = sum(1 for r in rows if norm(r) in dev | test) - len(env.tasks("dev")) - 8
    assert sum(len(env.tasks(s)) for s in SPLITS) == 40 - twins and twins > 0


RAMBLE = ("Sam wants 5 coins and already has 4. So, 5 - 4 = 1 more.\n\nThe answer is 1.\n\n"
          "Now another problem: Tom has 12 apples and eats 3, so 12 - 3 = 9. Then 9 + 40 = 49")


@pytest.mark.parametrize("text, want", [
    # free text: the first cued number, whatever follows
    (RAMBLE, "1"),
    ("8 + 8 = 16 oranges.\n\nThe answer is 16.\n\nThe final answer is 16.", "16"),
    ("Step 3: 6 + 9 = 15 more stamps.\n\nFinal answer: 15\n\nThe answer is 15.", "15"),
    ("Total shells = 5 + 5 = 10\n\nThe answer is: 10", "10"),
    ("It costs a lot. The final answer is $1,250. Then we add 7 more.", "1,250"),
    # a cue without a number on its line does not answer; the next cue does
    ("1. 3 is the answer to the question.\n2. So 4 + 3 = 7.\nAnswer: 7 apples, and 8 later", "7"),
    # the instruction's own example block repeated by the model is no answer
    ("So 9 - 2 = 7.\n\nThe final number in the form <answer>N</answer> is 7.", "7"),
    ("The final number in the form <answer>N</answer> is 970. Then 5 + 5 = 10.", "970"),
    # the explicit format wins over cues
    ("The answer is 3. <answer>4</answer>", "4"),
    ("So the total is \\boxed{12}. The answer is 13.", "12"),
    # no answer at all: nothing to score (no last-number fallback)
    ("1. 7 + 8 = 15\n2. 15 + 1 = 16\n3. 16 + 1 = 17", None),
])
def test_math_extraction_reads_the_announced_answer(text, want):
    env = make_env({"name": "math", "train_size": 1, "eval_size": 1})
    assert env.extract_answer(text) == want


def test_math_extraction_does_not_depend_on_where_the_length_cap_cuts():
    """A reply that answers and rambles on: every cut after the answer extracts the same answer,
    and every cut before it extracts nothing (a longer cap never turns a right answer wrong)."""
    env = make_env({"name": "math", "train_size": 1, "eval_size": 1})
    words = RAMBLE.split(" ")
    answered = RAMBLE.index("The answer is 1.") + len("The answer is 1")
    for k in range(1, len(words) + 1):
        cut = " ".join(words[:k])
        assert env.extract_answer(cut) == ("1" if len(cut) >= answered else None), cut


def test_math_reward_of_rambling_reply_keeps_format_component():
    env = make_env({"name": "math", "train_size": 1, "eval_size": 1, "format_weight": 0.1})
    task = {"id": "t", "question": "Sam wants 5 coins and has 4. How many more?", "answer": "1"}
    r = env.reward(task, {"single": RAMBLE})
    assert r.components == {"correct": 1.0, "format": 0.0} and r.total == 1.0
    r = env.reward(task, {"single": "5 - 4 = 1. <answer>1</answer>"})
    assert r.components == {"correct": 1.0, "format": 1.0} and r.total == pytest.approx(1.1)
