"""`env.reward_fn` / `env.reward_weights`: a user's reward functions on any env (envs/reward_fn.py)."""
import json
import math
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from envs.base import make_env
from marl_llm import envcheck
from marl_llm.config import ConfigError, conf_dir, validate

ROOT = Path(__file__).resolve().parents[2]
USER_MODULE = textwrap.dedent('''
    def half(task, outputs):
        return 0.5

    def parts(task, outputs):
        return {"x": 0.25, "y": 1.0}
    parts.max_reward = 2.0

    def words(task, outputs):
        return float(len(outputs["single"].split()))
    words.max_reward = 10

    def text(task, outputs):
        return "high"

    def bad_part(task, outputs):
        return {"x": None}

    def nan(task, outputs):
        return float("nan")

    NOT_A_FUNCTION = 3

    def odd_max(task, outputs):
        return 1.0
    odd_max.max_reward = "one"

    def correct(task, outputs):
        return 1.0
''')


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    """`rf_user`, a reward module in a folder on sys.path (imported afresh by each test)."""
    (tmp_path / "rf_user.py").write_text(USER_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, "rf_user", raising=False)
    return tmp_path


def toy(reward_fn, weights=None, **kw):
    return make_env({"name": "toy", "reward_fn": reward_fn, "reward_weights": weights, **kw})


# ---- loading and validation: one ConfigError line naming the value and what is allowed ----------------
@pytest.mark.parametrize("spec, weights, needle", [
    ("rf_user", None, "env.reward_fn entry 'rf_user' is not 'module:function' or 'env'"),
    ("rf_user.half", None, "is not 'module:function' or 'env'"),
    ("no_such_module_xyz:f", None, "cannot import module 'no_such_module_xyz' (ModuleNotFoundError"),
    ("rf_user:nope", None, "module 'rf_user' has no attribute 'nope'; its functions: ['bad_part', 'correct'"),
    ("rf_user:NOT_A_FUNCTION", None, "rf_user.NOT_A_FUNCTION is a int, not callable"),
    ("rf_user:odd_max", None, "its max_reward attribute is 'one'; set a number or leave it out"),
    (3, None, "env.reward_fn=3 is not a string or a list of strings"),
    (["env", "env"], None, "names a reward twice"),
    (["env", "rf_user:half"], [1.0], "env.reward_weights=[1.0] has 1 entries but env.reward_fn has 2"),
    (None, [1.0], "env.reward_weights=[1.0] is set but env.reward_fn is not"),
])
def test_bad_specs_are_config_errors(user_module, spec, weights, needle):
    with pytest.raises(ConfigError) as e:
        toy(spec, weights)
    assert needle in str(e.value) and "\n" not in str(e.value)


def test_module_that_fails_to_import_names_module_and_error(user_module):
    (user_module / "rf_broken.py").write_text("import no_such_dependency_xyz\n")
    with pytest.raises(ConfigError, match=r"cannot import module 'rf_broken' \(ModuleNotFoundError: No module "
                                          r"named 'no_such_dependency_xyz'\)"):
        toy("rf_broken:f")


def test_bad_spec_stops_run_validation():
    """The path `python -m marl_llm.train` takes: validation, before any engine starts."""
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["env=toy", "env.reward_fn=[env,no_such_module_xyz:f]"])
    with pytest.raises(ConfigError, match="cannot import module 'no_such_module_xyz'"):
        validate(cfg)


def test_current_folder_is_importable(tmp_path, monkeypatch):
    """Launchers other than `python -m` leave the current folder off sys.path; it is added."""
    (tmp_path / "rf_cwd.py").write_text("def f(task, outputs):\n    return 0.25\n")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "rf_cwd", raising=False)
    assert toy("rf_cwd:f").reward({"id": "t"}, {"single": "x"}).total == 0.25


def test_single_string_and_list_both_accepted(user_module):
    assert toy("rf_user:half").cfg.reward_fn == ["rf_user:half"]
    assert toy(["env", "rf_user:half"]).cfg.reward_fn == ["env", "rf_user:half"]
    assert type(toy(None)).__name__ == "ToyEnv"  # no reward_fn: the env itself


# ---- the weighted sum and its components ---------------------------------------------------------------
def test_weighted_sum_and_components_by_hand(user_module):
    env = toy(["env", "rf_user:half", "rf_user:parts"], [2.0, 1.0, 0.5])
    r = env.reward({"id": "t"}, {"single": "aaab"})  # toy share: 3 of 4 letters are vowels
    assert r.total == pytest.approx(2.0 * 0.75 + 1.0 * 0.5 + 0.5 * (0.25 + 1.0))
    assert r.components == {"share": 0.75, "half": 0.5, "parts/x": 0.25, "parts/y": 1.0}  # unweighted
    assert [x.total for x in env.reward_batch([({"id": "t"}, {"single": "aaab"})] * 2)] == [r.total] * 2


def test_env_reward_counts_only_when_listed(user_module):
    env = toy("rf_user:half")
    r = env.reward({"id": "t"}, {"single": "aaaa"})  # toy alone would give 1.0
    assert r.total == 0.5 and r.components == {"half": 0.5}


def test_env_part_uses_the_envs_batch_call_and_keeps_its_info(user_module):
    """Coding envs run the sandbox in parallel in reward_batch; transition reuses Reward.info."""
    env = toy(["env", "rf_user:half"])
    calls = []
    inner_batch = env.env.reward_batch
    env.env.reward_batch = lambda items: calls.append(len(items)) or inner_batch(items)
    env.reward_batch([({"id": "a"}, {"single": "ab"}), ({"id": "b"}, {"single": "ab"})])
    assert calls == [2]
    math_env = make_env({"name": "math", "train_size": 2, "eval_size": 1, "reward_fn": ["env", "rf_user:half"]})
    task = math_env.train_tasks()[0]
    r = math_env.reward(task, {"single": f"<answer>{task['answer']}</answer>"})
    assert r.components["correct"] == 1.0 and r.total == 1.5  # MLPO reads the unprefixed `correct`
    assert r.info["gold"] == task["answer"]


def test_everything_else_is_the_envs(user_module):
    env = toy("rf_user:half", train_size=3, eval_size=2)
    assert len(env.train_tasks()) == 3 and env.roles == ("single", "agent1", "agent2")
    assert env.prompt(env.train_tasks()[0])[0]["content"].startswith("Write a few words")
    assert env.reference_outputs({"id": "t"}) == {"single": "aeiou"}


def test_user_component_named_like_the_envs_is_an_error(user_module):
    env = make_env({"name": "math", "train_size": 1, "eval_size": 1, "reward_fn": ["env", "rf_user:correct"]})
    with pytest.raises(ValueError, match=r"'correct' and an earlier entry both give the component\(s\) \['correct'\]"):
        env.reward(env.train_tasks()[0], {"single": "7"})


# ---- maxima --------------------------------------------------------------------------------------------
def test_max_reward_is_the_weighted_sum_of_declared_maxima(user_module):
    assert toy(["env", "rf_user:parts"], [2.0, 0.5]).max_reward == 2.0 * 1.0 + 0.5 * 2.0
    assert toy(["env", "rf_user:half"]).max_reward == math.inf  # `half` declares no max_reward
    assert toy(["env", "rf_user:parts"], [1.0, -1.0]).max_reward == math.inf  # would need parts' minimum
    assert toy(["env", "rf_user:half"], [1.0, 0.0]).max_reward == 1.0  # weight 0: no contribution
    coding = make_env({"name": "coding", "reward_fn": ["env", "rf_user:parts"]})
    assert coding.max_reward_for(["single"]) == 1.0 + 2.0 and coding.max_reward_for(["aux", "main"]) == 4.0 + 2.0


def test_unknown_max_is_null_in_envchecks_json(user_module, capsys):
    rc = envcheck.main(["env=toy", "env.reward_fn=rf_user:half", "env.train_size=3", "env.eval_size=1",
                        "--reference", "--json"])
    out = capsys.readouterr().out
    s = json.loads(out.strip().splitlines()[-1])
    assert rc == 0 and s["mean_reward"] == 0.5 and s["max_reward"] is None and s["frac_max"] is None
    assert "max reward    unknown" in out and "Infinity" not in out


# ---- what a function returns --------------------------------------------------------------------------
@pytest.mark.parametrize("fn, needle", [
    ("text", "env.reward_fn 'text' returned 'high' as its reward"),
    ("bad_part", "env.reward_fn 'bad_part' returned None as its component 'x'"),
    ("nan", "env.reward_fn 'nan' returned nan as its reward"),
])
def test_non_number_return_names_function_and_value(user_module, fn, needle):
    with pytest.raises(TypeError) as e:
        toy(f"rf_user:{fn}").reward({"id": "t"}, {"single": "x"})
    assert needle in str(e.value)


# ---- end to end: a user's functions train and evaluate a tiny run -----------------------------------------
@pytest.mark.engine
def test_user_reward_trains_a_tiny_run_end_to_end(tmp_path):
    from examples.rewards import brevity, tidy

    cmd = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "rollout.backend=hf",
           "env.reward_fn=[examples.rewards:brevity,examples.rewards:tidy]", "env.reward_weights=[1.0,0.5]",
           "trainer.steps=1", "trainer.batch_size=2", "algo.group_size=2", "rollout.max_new_tokens=8",
           "algo.eval_baselines=[]", "trainer.eval_size=2", "trainer.save_every=0", "trainer.report=false",
           "trainer.progress=false", f"trainer.output_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-4000:]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    for key in ("reward/brevity", "reward/tidy/distinct", "reward/tidy/ends_sentence",
                "test/reward", "test/brevity", "test/tidy/distinct"):  # the final evaluation, on the test split
        assert key in rec, key
    assert "reward/share" not in rec  # the env's own reward is not listed
    episodes = [json.loads(l) for l in (tmp_path / "buffer.jsonl").read_text().splitlines()]
    assert len(episodes) == 4
    for ep in episodes:
        task, outputs = ep["task"], {"single": ep["turns"][0]["text"]}
        expected = brevity(task, outputs) + 0.5 * sum(tidy(task, outputs).values())
        assert ep["reward"] == pytest.approx(expected)
        assert ep["components"]["brevity"] == pytest.approx(brevity(task, outputs))
    assert rec["reward/mean"] == pytest.approx(sum(ep["reward"] for ep in episodes) / 4)
