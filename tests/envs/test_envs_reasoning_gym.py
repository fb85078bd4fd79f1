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
