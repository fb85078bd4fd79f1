"""reasoning-gym env: seeded, disjoint, scored by the package's own scorers; clear errors."""
import pytest

from envs.base import SPLITS, make_env
from marl_llm.config import ConfigError


def test_unknown_task_lists_allowed():
    with pytest.raises(ConfigError) as e:
        make_env({"name": "reasoning_gym", "task": "no_such_task"})
    assert "'no_such_task'" in str(e.value) and "gsm_symbolic" in str(e.value) and "basic_arithmetic" in str(e.value)


def test_bad_task_config_names_it():
    env = make_env({"name": "reasoning_gym", "task": "basic_arithmetic", "train_size": 2, "eval_size": 2,
                    "task_config": {"no_such_knob": 3}})
    with pytest.raises(ConfigError, match="no_such_knob"):
        env.train_tasks()


@pytest.mark.parametrize("task", ["basic_arithmetic", "gsm_symbolic", "chain_sum"])
def test_seeded_disjoint_reference_and_shuffled(task):
    cfg = {"name": "reasoning_gym", "task": task, "train_size": 30, "eval_size": 10}
    a, b = make_env(cfg, seed=5), make_env(cfg, seed=5)
    assert all(a.tasks(s) == b.tasks(s) for s in SPLITS)
    assert a.train_tasks() != make_env(cfg, seed=6).train_tasks()
    assert [len(a.tasks(s)) for s in SPLITS] == [24, 6, 10]  # dev: a fifth of train_size (env.dev_size capped)
    questions = [{t["question"] for t in a.tasks(s)} for s in SPLITS]
    assert sum(map(len, questions)) == len(set().union(*questions))
    tasks = a.train_tasks()[:10]
    assert all(a.reward(t, a.reference_outputs(t)).components["correct"] == 1.0 for t in tasks)
    shuffled = [a.reward(t, a.reference_outputs(tasks[(i + 1) % len(tasks)])).total for i, t in enumerate(tasks)]
    assert sum(shuffled) / len(shuffled) < 0.2


def test_scoring_in_a_fresh_env_uses_the_task_dict():
    cfg = {"name": "reasoning_gym", "task": "basic_arithmetic", "train_size": 5, "eval_size": 2}
    t = make_env(cfg).train_tasks()[0]
    fresh = make_env(cfg)  # e.g. a reward worker that never loaded the tasks
    assert fresh.reward(t, {"single": f"<answer>{t['answer']}</answer>"}).total == 1.0
    assert fresh.reward(t, {"single": "<answer>nonsense</answer>"}).total == 0.0


def test_few_shot_examples_are_solved_train_tasks_before_every_prompt():
    cfg = {"name": "reasoning_gym", "task": "chain_sum", "train_size": 30, "eval_size": 10, "few_shot": 2,
           "task_config": {"min_terms": 2, "max_terms": 2},
           "few_shot_reply": "{metadata[expression]} = {answer}\n<answer>{answer}</answer>"}
    env = make_env(cfg)
    first, second = env.train_tasks()[:2]
    for task in env.tasks("test")[:3] + env.tasks("dev")[:3]:
        msgs = env.prompt(task)
        assert [m["role"] for m in msgs] == ["system", "user", "assistant", "user", "assistant", "user"]
        assert msgs[1] == env.prompt(first)[-1] and task["question"] in msgs[-1]["content"]
        expression = first["metadata"]["expression"]
        assert msgs[2]["content"] == f"{expression} = {first['answer']}\n<answer>{first['answer']}</answer>"
        assert msgs[4]["content"].endswith(f"<answer>{second['answer']}</answer>")
    # the default shows the answer block only; none: the prompt as before
    plain = make_env({**cfg, "few_shot_reply": "<answer>{answer}</answer>"})
    assert plain.prompt(first)[2]["content"] == f"<answer>{first['answer']}</answer>"
    assert [m["role"] for m in make_env({**cfg, "few_shot": 0}).prompt(first)] == ["system", "user"]


def test_a_few_shot_reply_naming_a_missing_field_is_a_clear_error():
    env = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 10, "eval_size": 2, "few_shot": 1,
                    "few_shot_reply": "{metadata[steps]} <answer>{answer}</answer>"})
    with pytest.raises(ConfigError, match=r"env.few_shot_reply=.*'steps'.*metadata keys \[.*'expression'"):
        env.prompt(env.tasks("test")[0])
    with pytest.raises(ConfigError, match="env.few_shot=-1"):
        make_env({"name": "reasoning_gym", "few_shot": -1})
    too_many = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 10, "eval_size": 2, "few_shot": 50})
    with pytest.raises(ConfigError, match="env.few_shot=50 is more than the 8 train tasks"):
        too_many.prompt(too_many.tasks("test")[0])
