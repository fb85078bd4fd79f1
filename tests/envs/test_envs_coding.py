"""Coding envs: every level and stop of MAGRPO's aux/main reward, the single-agent test fraction,
per-test timeouts, HumanEval canonical solutions, MBPP / CoopHumanEval fixtures. All code runs in
the real marl_llm.sandbox."""
from pathlib import Path

import pytest

from envs.base import SPLITS, make_env
from envs.coding import extract_code, is_wrapper, split_tests, top_level_items

DATA = Path(__file__).resolve().parents[1] / "data"

PROMPT = 'def add_squares(a, b):\n    """Return a*a + b*b."""\n'
TEST = ("def check(candidate):\n    assert candidate(1, 2) == 5\n    assert candidate(0, 0) == 0\n"
        "    assert candidate(3, 4) == 25\n    assert candidate(-1, 1) == 2\n    assert True, 'not a test'\n")


@pytest.fixture(scope="module")
def env():
    return make_env({"name": "coding", "test_timeout_s": 0.5, "total_timeout_s": 4.0})


@pytest.fixture(scope="module")
def task(env):
    return env._normalise({"task_id": "T/0", "prompt": PROMPT, "test": TEST, "entry_point": "add_squares",
                           "canonical_solution": "    return a * a + b * b\n"}, "humaneval")


def code(s):
    return f"Here is my code:\n```python\n{s}\n```\nIt works."


AUX_SQ = "def aux(x):\n    return x * x"
GOOD_MAIN = "def add_squares(a, b):\n    s = aux(a)\n    return s + aux(b)"


def joint(env, task, aux, main):
    return env.reward(task, {"agent1": code(aux) if aux is not None else "I cannot help.",
                             "agent2": code(main) if main is not None else "no code"})


# ---- MAGRPO joint reward: every level and stop --------------------------------------------------------
@pytest.mark.parametrize("aux,main,total,comps", [
    # full marks: aux with return, main with return, parses, 4/4 tests, calls aux, not a wrapper
    (AUX_SQ, GOOD_MAIN, 4.0, {"structure": 1.0, "syntax": 0.5, "tests": 1.0, "cooperation": 1.5}),
    # trivial wrapper `return aux(...)`: no anti-wrapper bonus
    ("def aux(a, b):\n    return a * a + b * b", "def add_squares(a, b):\n    return aux(a, b)",
     3.0, {"structure": 1.0, "syntax": 0.5, "tests": 1.0, "cooperation": 0.5}),
    # wrapper via `r = aux(...); return r` (docstring ignored)
    ("def aux(a, b):\n    return a * a + b * b", 'def add_squares(a, b):\n    """doc"""\n    r = aux(a, b)\n    return r',
     3.0, {"structure": 1.0, "syntax": 0.5, "tests": 1.0, "cooperation": 0.5}),
    # aux called but its result ignored: -0.5
    (AUX_SQ, "def add_squares(a, b):\n    aux(a)\n    return a * a + b * b",
     3.5, {"structure": 1.0, "syntax": 0.5, "tests": 1.0, "cooperation": 1.0}),
    # main does not call aux: no cooperation bonus
    (AUX_SQ, "def add_squares(a, b):\n    return a * a + b * b",
     2.5, {"structure": 1.0, "syntax": 0.5, "tests": 1.0, "cooperation": 0.0}),
    # no aux at all (optional): 0.6 + 0.5 + 1.0
    (None, "def add_squares(a, b):\n    return a * a + b * b",
     2.1, {"structure": 0.6, "syntax": 0.5, "tests": 1.0, "cooperation": 0.0}),
    # aux defined without a return value: no +0.4
    ("def aux(x):\n    print(x)", "def add_squares(a, b):\n    return a * a + b * b",
     2.1, {"structure": 0.6, "syntax": 0.5, "tests": 1.0, "cooperation": 0.0}),
    # partial tests (2/4 pass) with a wrapper-like single return calling aux
    (AUX_SQ, "def add_squares(a, b):\n    return aux(a) + b",
     0.4 + 0.6 + 0.5 + 0.5 + 0.5, {"structure": 1.0, "syntax": 0.5, "tests": 0.5, "cooperation": 0.5}),
    # no test passes: no cooperation bonus even though main calls aux
    (AUX_SQ, "def add_squares(a, b):\n    s = aux(a)\n    return s + aux(b) + 100",
     1.5, {"structure": 1.0, "syntax": 0.5, "tests": 0.0, "cooperation": 0.0}),
    # STOP at level 1: main missing (aux's 0.4 stays)
    (AUX_SQ, None, 0.4, {"structure": 0.4, "syntax": 0.0, "tests": 0.0, "cooperation": 0.0}),
    # STOP at level 1: main without a return value
    (AUX_SQ, "def add_squares(a, b):\n    print(a)", 0.4, {"structure": 0.4, "syntax": 0.0, "tests": 0.0, "cooperation": 0.0}),
    # STOP at level 1 with nothing at all
    (None, None, 0.0, {"structure": 0.0, "syntax": 0.0, "tests": 0.0, "cooperation": 0.0}),
    # STOP at level 2: imports + aux + main do not parse
    ("def aux(x):\n    return x *", GOOD_MAIN, 1.0, {"structure": 1.0, "syntax": 0.0, "tests": 0.0, "cooperation": 0.0}),
])
def test_joint_reward_levels(env, task, aux, main, total, comps):
    r = joint(env, task, aux, main)
    assert r.total == pytest.approx(total)
    assert r.components == pytest.approx(comps)
    assert env.max_reward_for(["agent1", "agent2"]) == 4.0


def test_joint_aux_written_by_agent2_is_ignored_and_main_by_agent1_is_dropped(env, task):
    # agent 2 defining its own aux does not count as aux; agent 1's copy of the entry point is dropped
    r = joint(env, task, "def add_squares(a, b):\n    return 0", "def aux(x):\n    return x * x\n\n" + GOOD_MAIN)
    assert r.components["structure"] == pytest.approx(0.6)  # no aux from agent 1
    assert r.components["tests"] == 0.0  # agent 2's aux was dropped -> NameError in every test


def test_aliases_aux_main(env, task):
    r = env.reward(task, {"aux": code(AUX_SQ), "main": code(GOOD_MAIN)})
    assert r.total == pytest.approx(4.0)


# ---- per-test timeouts and the stop after repeated timeouts ---------------------------------------------
def test_one_slow_test_times_out_alone(env, task):
    main = "def add_squares(a, b):\n    while a == 3:\n        pass\n    return a * a + b * b"
    r = env.reward(task, {"single": code(main)})
    res = [x["r"] for x in r.info["tests"]["results"]]
    assert res == ["pass", "pass", "timeout", "pass"] and r.total == pytest.approx(0.75)


def test_stop_after_repeated_timeouts(env):
    t = env._normalise({"task_id": "T/1", "prompt": "def f(x):\n    pass\n", "entry_point": "f",
                        "test": "def check(candidate):\n" + "".join(f"    assert candidate({i}) == {i}\n" for i in range(5))},
                       "humaneval")
    main = "def f(x):\n    while x < 3:\n        pass\n    return x"  # tests 0,1,2 hang; 3,4 would pass
    r = env.reward(t, {"agent1": code(AUX_SQ), "agent2": code(main)})
    assert [x["r"] for x in r.info["tests"]["results"]] == ["timeout"] * 3 + ["skipped"] * 2
    assert r.components["tests"] == 0.0 and r.components["cooperation"] == 0.0
    assert r.total == pytest.approx(1.5)


def test_uninterruptible_code_hits_the_sandbox_wall_clock(env, task):
    main = "def add_squares(a, b):\n    return sum(range(10 ** 12)) if a == 0 else a * a + b * b"
    r = env.reward(task, {"single": code(main)})
    assert r.info["tests"]["status"] == "timeout"
    assert [x["r"] for x in r.info["tests"]["results"]] == ["pass", "timeout", "timeout", "timeout"]
    assert r.total == pytest.approx(0.25)


# ---- single agent ------------------------------------------------------------------------------------
def test_single_agent_fraction_and_forms(env, task):
    assert env.max_reward_for(["single"]) == 1.0
    full = env.reward(task, {"single": code("def add_squares(a, b):\n    return a * a + b * b")})
    assert full.total == 1.0 and full.components == {"tests": 1.0, "pass_all": 1.0, "syntax": 1.0}
    half = env.reward(task, {"single": code("def add_squares(a, b):\n    return a * a + b")})
    assert half.total == 0.5 and half.components["pass_all"] == 0.0
    body_only = env.reward(task, {"single": "    return a * a + b * b\n"})  # completion style
    assert body_only.total == 1.0
    no_fence = env.reward(task, {"single": "import math\n\ndef add_squares(a, b):\n    return int(math.pow(a, 2)) + b * b\n\nprint(add_squares(1, 2))"})
    assert no_fence.total == 1.0
    bad = env.reward(task, {"single": code("def add_squares(a, b) return a")})
    assert bad.total == 0.0 and bad.components["syntax"] == 0.0
    wrong_name = env.reward(task, {"single": code("def other(a, b):\n    return a * a + b * b")})
    assert wrong_name.total == 0.0


def test_hostile_outputs_score_zero(env, task):
    # exits before the tests run; prints a fake result line; floods output
    for prog in ["import os\nos._exit(0)",
                 "import os\ndef add_squares(a, b):\n    os.write(1, b'@@MARL_0@@{\"i\": 0, \"r\": \"pass\"}\\n')\n"
                 "    print('@@MARL_0@@{\"i\": 1, \"r\": \"pass\"}')\n    return -1",
                 "import sys\nsys.exit(0)",
                 "def add_squares(a, b):\n    print('x' * 10**6)\n    return -1"]:
        r = env.reward(task, {"single": code(prog)})
        assert r.total == 0.0, prog


def test_reward_batch_matches_reward(env, task):
    outs = [{"single": code("def add_squares(a, b):\n    return a * a + b * b")},
            {"single": code("def add_squares(a, b):\n    return 0")},
            {"agent1": code(AUX_SQ), "agent2": code(GOOD_MAIN)}]
    batch = env.reward_batch([(task, o) for o in outs])
    assert [r.total for r in batch] == pytest.approx([1.0, 0.25, 4.0])


# ---- multi-turn feedback ---------------------------------------------------------------------------
def test_transition_gives_unit_test_diagnostics(env, task):
    outs = {"agent1": code(AUX_SQ), "agent2": code("def add_squares(a, b):\n    return aux(a) + b")}
    r = env.reward(task, outs)
    fb = env.transition(task, outs, r)
    assert set(fb) == {"agent1", "agent2"}
    assert "Passed 2/4 unit tests" in fb["agent2"]
    assert "add_squares(1, 2) == 5" in fb["agent2"] and "got 3" in fb["agent2"]
    fb = env.transition(task, {"agent1": "none", "agent2": code(GOOD_MAIN)}, env.reward(task, {"agent1": "none", "agent2": code(GOOD_MAIN)}))
    assert "No helper function `aux`" in fb["agent1"]
    single = {"single": code("def add_squares(a, b):\n    return 0")}
    fb = env.transition(task, single, env.reward(task, single))["single"]
    assert "Passed 1/4" in fb
    p = env.prompt(task, "single", previous=single["single"], feedback=fb)[-1]["content"]
    assert "Here is the feedback" in p and "Passed 1/4" in p


def test_prompts(env, task):
    s = env.prompt(task, "single")[-1]["content"]
    assert PROMPT.strip() in s and "`add_squares`" in s
    a1 = env.prompt(task, "agent1")[-1]["content"]
    assert "`aux(...)`" in a1
    a2 = env.prompt(task, "agent2", agent1=code(AUX_SQ))[-1]["content"]
    assert "do not define `aux`" in a2 and "return x * x" in a2
    assert env.prompt(task, "aux") == env.prompt(task, "agent1")


# ---- helpers ---------------------------------------------------------------------------------------
def test_extract_code_and_items():
    assert extract_code("```python\nx = 1\n```\ntext\n```\ny = 2\n```") == "x = 1\n\ny = 2"
    assert extract_code("```python\ndef f():\n    return 1") == "def f():\n    return 1"
    items = top_level_items("import os\n\nX = 3\n\n@dec\ndef f():\n    return 1\n\nprint(f())\nif __name__ == '__main__':\n    f()\n")
    assert [(i.kind, i.name) for i in items] == [("import", ""), ("assign", ""), ("def", "f")]
    assert items[2].src.startswith("@dec")
    broken = top_level_items("Sure!\ndef g(x):\n    return x +\n\nimport re\n")
    assert [(i.kind, i.name) for i in broken] == [("def", "g"), ("import", "")]


def test_is_wrapper():
    it = lambda s: top_level_items(s)[0]  # noqa: E731
    assert is_wrapper(it("def m(x):\n    return aux(x)"), "aux")
    assert is_wrapper(it("def m(x):\n    return 1 + aux(x)"), "aux")
    assert is_wrapper(it("def m(x):\n    '''d'''\n    v = aux(x)\n    return v"), "aux")
    assert not is_wrapper(it("def m(x):\n    v = aux(x)\n    return v + 1"), "aux")
    assert not is_wrapper(it("def m(x):\n    y = x * 2\n    return aux(y)"), "aux")


def test_split_tests_humaneval_shapes():
    t = split_tests("import math\n\ndef check(candidate):\n    '''doc'''\n    xs = [1, 2]\n    for x in xs:\n"
                    "        assert candidate(x) == x\n    assert candidate(3) == 3\n    assert True\n\ncheck(f)\n", "f")
    assert t["candidate"] and t["setup"] == "import math"
    assert [k for k, _ in t["steps"]] == ["setup", "test", "test"]


# ---- datasets ------------------------------------------------------------------------------------------
def test_humaneval_canonical_solutions_full_marks_and_shuffled_zero():
    env = make_env({"name": "coding", "data": {"eval_size": 0, "limit": 20}, "dev_size": 0})
    tasks = env.train_tasks()
    assert len(tasks) == 20
    scores = [r.total for r in env.reward_batch([(t, env.reference_outputs(t)) for t in tasks])]
    assert scores == [1.0] * 20
    shuffled = env.reward_batch([(t, env.reference_outputs(tasks[(i + 1) % 20])) for i, t in enumerate(tasks)])
    assert sum(r.total for r in shuffled) / 20 < 0.1


def test_humaneval_split_is_disjoint_and_seeded():
    a = make_env({"name": "coding"}, seed=0)
    b = make_env({"name": "coding"}, seed=0)
    assert all([t["id"] for t in a.tasks(s)] == [t["id"] for t in b.tasks(s)] for s in SPLITS)
    # 32 held out as the test split; the dev split, a fifth of the other 132 (env.dev_size=100 capped)
    assert [len(a.tasks(s)) for s in SPLITS] == [132 - 26, 26, 32]
    ids = [{t["id"] for t in a.tasks(s)} for s in SPLITS]
    assert sum(map(len, ids)) == len(set().union(*ids)) == 164


def test_mbpp_fixture():
    env = make_env({"name": "mbpp", "data": {"path": str(DATA / "mbpp.jsonl"), "eval_size": 1}})
    tasks = [t for s in SPLITS for t in env.tasks(s)]
    assert len(tasks) == 4
    assert {t["entry_point"] for t in tasks} == {"digit_sum", "is_pal", "dist", "evens"}
    assert [r.total for r in env.reward_batch([(t, env.reference_outputs(t)) for t in tasks])] == [1.0] * 4
    t = next(t for t in tasks if t["entry_point"] == "dist")
    assert "assert math.isclose(dist(0, 0, 3, 4), 5.0)" in env.prompt(t, "single")[-1]["content"]
    main = "def dist(x1, y1, x2, y2):\n    return math.hypot(*aux(x1, y1, x2, y2))"
    aux = "def aux(x1, y1, x2, y2):\n    return (x2 - x1, y2 - y1)"
    r = env.reward(t, {"agent1": code(aux), "agent2": code(main)})
    assert r.total == pytest.approx(3.0)  # a one-line `return ...aux(...)` is a wrapper


def test_coop_humaneval_fixture():
    env = make_env({"name": "coop_humaneval", "data": {"path": str(DATA / "coop_humaneval.jsonl"), "eval_size": 1}})
    tasks = [t for s in SPLITS for t in env.tasks(s)]
    assert len(tasks) == 2
    assert all(env.reward(t, env.reference_outputs(t)).total == 1.0 for t in tasks)


def test_missing_columns_are_named(tmp_path):
    p = tmp_path / "bad.jsonl"
    p.write_text('{"task_id": "x", "question": "q"}\n{"task_id": "y", "question": "q"}\n')
    env = make_env({"name": "coop_humaneval", "data": {"path": str(p), "eval_size": 0}})
    with pytest.raises(ValueError, match=r"lacks \['prompt', 'test', 'entry_point'\]"):
        env.train_tasks()
