"""`python -m marl_llm.envcheck`: reference answers score full marks, shuffled ones near zero, and
bad input gives one clear line."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from marl_llm import envcheck

ROOT = Path(__file__).resolve().parents[2]
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k" / "train.jsonl"
needs_gsm8k = pytest.mark.skipif(not GSM8K.exists(), reason="shared GSM8K file not present")


def run(capsys, *argv):
    rc = envcheck.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def last_json(out):
    return json.loads(out.strip().splitlines()[-1])


@needs_gsm8k
@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_gsm8k_gold_full_marks_cli():
    """The real CLI in a subprocess, as a user runs it."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    p = subprocess.run([sys.executable, "-m", "marl_llm.envcheck", "env=math", f"env.data.path={GSM8K}",
                        "--reference", "--limit", "200", "--json"], cwd=ROOT, env=env,
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    s = last_json(p.stdout)
    assert s["n"] == 200 and s["mean_reward"] == 1.0 and s["max_reward"] == 1.0
    assert "mean reward" in p.stdout


@needs_gsm8k
def test_gsm8k_shuffled_near_zero(capsys):
    rc, out, _ = run(capsys, "env=math", f"env.data.path={GSM8K}", "--reference", "--shuffle", "--limit", "200", "--json")
    s = last_json(out)
    assert rc == 0 and s["n"] == 200 and s["mean_reward"] < 0.05


def test_humaneval_canonical_full_marks_and_shuffled(capsys):
    rc, out, _ = run(capsys, "env=coding", "--reference", "--limit", "20", "--json")
    s = last_json(out)
    assert rc == 0 and s["n"] == 20 and s["mean_reward"] == 1.0 and s["max_reward"] == 1.0
    rc, out, _ = run(capsys, "env=coding", "--reference", "--shuffle", "--limit", "20", "--json")
    assert last_json(out)["mean_reward"] < 0.1


def test_generator_and_overrides(capsys):
    rc, out, _ = run(capsys, "env=math", "env.difficulty=2", "env.train_size=30", "env.eval_size=5",
                     "--reference", "--json")
    s = last_json(out)
    assert rc == 0 and s["n"] == 35 and s["mean_reward"] == 1.0
    for split, n in (("test", 5), ("dev", 6), ("train", 24)):  # dev: a fifth of train_size (env.dev_size capped)
        rc, out, _ = run(capsys, "env=math", "env.train_size=30", "env.eval_size=5", "--reference", "--split", split,
                         "--json")
        assert last_json(out)["n"] == n


@pytest.mark.parametrize("name,extra", [
    ("competition_math", ["env.data.path=tests/data/competition_math.jsonl", "env.data.eval_size=2"]),
    ("mmlu", ["env.data.path=tests/data/mmlu.jsonl"]),
    ("csqa", ["env.data.path=tests/data/csqa.jsonl"]),
    ("bbh", ["env.data.path=tests/data/bbh.jsonl"]),
    ("mbpp", ["env.data.path=tests/data/mbpp.jsonl"]),
    ("coop_humaneval", ["env.data.path=tests/data/coop_humaneval.jsonl"]),
    ("reasoning_gym", ["env.task=gsm_symbolic", "env.train_size=20", "env.eval_size=5"]),
])
def test_every_answer_env_scores_its_references(capsys, monkeypatch, name, extra):
    monkeypatch.chdir(ROOT)
    rc, out, err = run(capsys, f"env={name}", *extra, "--reference", "--json")
    assert rc == 0, err
    s = last_json(out)
    assert s["n"] > 0 and s["mean_reward"] == s["max_reward"]


def test_writing_reference_runs(capsys, monkeypatch):
    monkeypatch.chdir(ROOT)
    rc, out, _ = run(capsys, "env=writing", "env.data.path=examples/data/tldr_posts.jsonl", "--reference", "--json")
    s = last_json(out)
    assert rc == 0 and s["n"] == 41 and s["max_reward"] == 3.0 and s["mean_reward"] > 2.3
    assert set(s["components"]) == {"structure", "coherence", "consistency", "grounding", "total"}


def test_bring_your_own_data_example(capsys, monkeypatch):
    """docs/DATA.md: examples/data/my_math.jsonl, columns q and a mapped onto the math env's fields."""
    monkeypatch.chdir(ROOT)
    rc, out, err = run(capsys, "env=math", "env.data.path=examples/data/my_math.jsonl", "env.data.fields.question=q",
                       "env.data.fields.answer=a", "env.data.eval_size=6", "--reference", "--json")
    s = last_json(out)
    assert rc == 0, err
    assert s["n"] == 30 and s["mean_reward"] == s["max_reward"] == 1.0 and s["components"]["correct"] == 1.0
    rc, out, _ = run(capsys, "env=math", "env.data.path=examples/data/my_math.jsonl", "env.data.fields.question=q",
                     "env.data.fields.answer=a", "--reference", "--shuffle", "--json")
    assert rc == 0 and last_json(out)["mean_reward"] < 0.1


def test_describe_mode(capsys):
    rc, out, _ = run(capsys, "env=reasoning_gym", "env.task=basic_arithmetic", "env.train_size=10", "env.eval_size=2",
                     "--json")
    s = last_json(out)
    assert rc == 0 and (s["n_train"], s["n_dev"], s["n_test"]) == (8, 2, 2)
    assert s["roles"] == ["single"]  # the task's roles only
    assert "8 train / 2 dev / 2 test tasks" in out


@pytest.mark.parametrize("argv,needle", [
    (["env=nope", "--reference"], "choose one of ["),
    (["env=math", "env.data.path=/definitely/missing.jsonl", "--reference"], "/definitely/missing.jsonl"),
    (["env=math", "env.bogus=1"], "env.bogus"),
    (["env=math", "env.difficulty=0"], "env.difficulty=0"),
    (["env=reasoning_gym", "env.task=nope"], "'nope' is not a reasoning-gym dataset"),
    (["env=mmlu", "--reference"], "env.data.path="),  # offline Hub failure
    (["env=math", "env.data.path=tests/data/mmlu.jsonl", "env.data.fields.question=problem", "--reference"],
     "column(s) not found"),
    (["env=math", "trainer.steps=3"], "only takes env.* overrides"),
    (["env=toy", "env.reward_fn=examples.rewards:nope"], "module 'examples.rewards' has no attribute 'nope'"),
])
def test_bad_input_is_one_clear_line(capsys, monkeypatch, argv, needle):
    monkeypatch.chdir(ROOT)
    rc, out, err = run(capsys, *argv)
    assert rc == 2 and needle in err and "Traceback" not in err


def test_compose_env_api():
    cfg = envcheck.compose_env("math", ["env.difficulty=3", "env.format_weight=0.1"])
    assert cfg.difficulty == 3 and cfg.format_weight == 0.1 and cfg.data.hub_config == "main"
    env = envcheck.build_env("math", ["env.train_size=4", "env.eval_size=2"], seed=3)
    assert len(env.train_tasks()) == 4 and env.max_reward == 1.0
