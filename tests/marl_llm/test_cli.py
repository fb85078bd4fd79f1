"""The command line answers a newcomer: one entry point, --help with every key described, `list`,
`--cfg job` validating like a run, a misspelt key answered with the nearest ones, presets without
`+`, quiet logs; and the Python API runs what the CLI runs."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from marl_llm import cli
from marl_llm.confdoc import field_docs, nearest
from marl_llm.config import ConfigError, LearnerConfig, TrainerConfig

ROOT = Path(__file__).resolve().parents[2]


def run(*args, timeout=300, **kw):
    return subprocess.run([sys.executable, "-m", *args], cwd=kw.pop("cwd", ROOT), capture_output=True, text=True,
                          timeout=timeout, **kw)


# ---- fast: no engine ---------------------------------------------------------------------------
def test_field_docs_come_from_the_dataclass_comments():
    docs = field_docs(TrainerConfig)
    assert docs["steps"].startswith("optimiser steps")
    assert "checkpoint" in docs["save_every"]
    assert "AdamW" in field_docs(LearnerConfig)["betas"]
    # a comment above the field (several lines joined), inherited fields included
    assert "share of the cores" in field_docs(LearnerConfig)["threads"]


def test_nearest_keys():
    valid = ["trainer.steps", "trainer.save_every", "learner.lr", "algo.group_size"]
    assert nearest("trainer.step", valid) == ["trainer.steps"]
    assert nearest("lr", valid) == ["learner.lr"]
    assert nearest("algo.group_sze", valid) == ["algo.group_size"]
    assert nearest("zzz.qqq", valid) == []


def test_split_args_reads_flags_overrides_and_presets():
    flags, overrides, verbose = cli.split_args(["--cfg", "job", "experiment=smoke", "-v", "trainer.steps=2"])
    assert flags == ["--cfg", "job"] and overrides == ["+experiment=smoke", "trainer.steps=2"] and verbose
    with pytest.raises(ConfigError, match="unknown option '--bogus'"):
        cli.split_args(["--bogus"])


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_top_level_help_lists_the_commands():
    r = run("marl_llm", "--help")
    assert r.returncode == 0
    for command in ("train", "evaluate", "report", "envcheck", "list"):
        assert f"  {command} " in r.stdout
    r = run("marl_llm", "nope")
    assert r.returncode == 2 and r.stderr.startswith("error: unknown command 'nope'")


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_list_shows_algorithms_envs_with_columns_presets_and_experiments():
    r = run("marl_llm", "list")
    assert r.returncode == 0, r.stderr
    out = r.stdout
    for name in ("grpo", "mlpo", "magrpo", "malt", "smollm2-135m", "cpu_grpo_math", "smoke"):
        assert f"  {name} " in out
    math_line = next(l for l in out.splitlines() if l.startswith("  math "))
    assert "[columns: question, answer]" in math_line
    assert "[columns: none (generated tasks)]" in next(l for l in out.splitlines() if l.startswith("  toy "))


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
@pytest.mark.parametrize("entry", [("marl_llm.train",), ("marl_llm", "train"), ("marl_llm.evaluate",),
                                   ("marl_llm", "envcheck"), ("marl_llm", "report")])
def test_help_on_every_entry_point(entry):
    r = run(*entry, "--help")
    assert r.returncode == 0, r.stderr
    assert "usage" in r.stdout.lower() or "python -m marl_llm" in r.stdout
    if entry[-1] in ("marl_llm.train", "train", "marl_llm.evaluate"):
        assert "trainer.steps = " in r.stdout and "optimiser steps" in r.stdout
    if entry[-1] == "envcheck":
        assert "env.data.fields" in r.stdout


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_train_help_describes_the_composition_asked_for():
    r = run("marl_llm.train", "--help", "algo=magrpo", "env=writing")
    assert r.returncode == 0, r.stderr
    assert "algo.name = 'magrpo'" in r.stdout and "env.name = 'writing'" in r.stdout


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_cfg_job_validates_like_a_run():
    r = run("marl_llm.train", "--cfg", "job", "algo=magrpo", "algo.joint=both")
    assert r.returncode == 2 and r.stdout == ""
    assert r.stderr.strip() == "error: algo.joint='both' is not allowed; choose one of ['aligned', 'cross']"
    good = run("marl_llm.train", "--cfg", "job", "experiment=smoke")
    assert good.returncode == 0 and "name: toy" in good.stdout, good.stderr


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
@pytest.mark.parametrize("override, expected", [
    ("trainer.step=2", "error: unknown key trainer.step; did you mean trainer.steps?"),
    ("+trainer.step=2", "error: unknown key trainer.step; did you mean trainer.steps?"),
    ("algo.group_sze=4", "error: unknown key algo.group_sze; did you mean algo.group_size?"),
    ("lr=0.1", "error: unknown key lr; did you mean learner.lr?"),
])
def test_misspelt_key_gets_the_nearest_valid_keys(override, expected, tmp_path):
    r = run("marl_llm.train", "algo=grpo", override, f"trainer.output_dir={tmp_path}")
    assert r.returncode == 2 and r.stderr.strip() == expected, r.stderr


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_unknown_preset_is_one_line():
    r = run("marl_llm.train", "experiment=nope", "--cfg", "job")
    assert r.returncode == 2 and r.stderr.count("\n") == 1
    assert "Could not find 'experiment/nope'" in r.stderr and "cpu_grpo_math" in r.stderr


def test_api_compose_and_validation_errors():
    from marl_llm import RunConfig, compose, train

    run_cfg = compose("experiment=smoke", "trainer.steps=3")
    assert isinstance(run_cfg, RunConfig) and run_cfg.algo.name == "grpo" and run_cfg.trainer.steps == 3
    run_cfg.trainer.steps = -1  # edited after validation: checked again before anything starts
    with pytest.raises(ConfigError, match=r"trainer.steps=-1 must be >= 0"):
        train(run_cfg)
    with pytest.raises(ConfigError, match="did you mean trainer.steps"):
        compose("trainer.step=2")


def test_a_mapping_set_whole_with_a_key_it_lacks_names_the_key_and_how_to_add_it():
    from marl_llm import compose

    with pytest.raises(ConfigError, match=r"^unknown key env\.task_config\.operators; .*"
                                          r"\+env\.task_config\.operators=VALUE, or \+\+env\.task_config="):
        compose("experiment=cpu_grpo_chain_sum", 'env.task_config={operators: ["+"]}')
    cfg = compose("experiment=cpu_grpo_chain_sum", '++env.task_config={operators: ["+"]}')
    assert cfg.env.task_config["operators"] == ["+"] and cfg.env.task_config["max_digits"] == 2


# ---- the engines: a tiny run through the CLI and one through the API -----------------------------
TINY = ["algo=grpo", "env=toy", "model=tiny", "rollout.backend=hf", "trainer.steps=2", "trainer.batch_size=2",
        "algo.group_size=2", "rollout.max_new_tokens=8", "algo.eval_baselines=[]", "trainer.eval_every=0",
        "trainer.test=false", "trainer.save_every=0", "trainer.report=false"]


@pytest.mark.engine
def test_a_run_is_quiet_by_default_and_prints_its_summary_once(tmp_path):
    r = run("marl_llm", "train", *TINY, "trainer.progress=false", f"trainer.output_dir={tmp_path}", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pid=" not in r.stderr and "libtcmalloc" not in r.stderr, r.stderr  # no actor chatter
    # Ray's raylet warns on the terminal when the disk is over 95% full: a fact about the machine
    # the user should see (spilling may fail), not engine chatter
    rest = [line for line in r.stderr.splitlines() if line.strip() and "file_system_monitor" not in line]
    assert rest == [], r.stderr
    assert json.loads(r.stdout[r.stdout.index("\n{") + 1:])["steps"] == 2  # the summary, once, last
    assert r.stdout.count('"output_dir"') == 1 and "done:" not in r.stdout
    engines = (tmp_path / "engines.log").read_text()
    assert "actor_name:LearnerWorker" in engines  # the actors' own output went there


@pytest.mark.engine
def test_verbose_brings_the_engine_output_back(tmp_path):
    r = run("marl_llm", "train", *TINY, "trainer.progress=false", f"trainer.output_dir={tmp_path}", "--verbose",
            timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "pid=" in r.stderr and not (tmp_path / "engines.log").exists()  # actors' output, prefixed by Ray


@pytest.mark.engine
def test_the_python_api_trains_and_returns_the_summary(tmp_path):
    code = ("import json, sys\nfrom marl_llm import compose, train\n"
            f"summary = train(compose(*{TINY!r}, 'trainer.progress=false', 'trainer.output_dir={tmp_path}'))\n"
            "print('SUMMARY=' + json.dumps(summary))\n")
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    summary = json.loads(r.stdout.split("SUMMARY=", 1)[1])
    assert summary["steps"] == 2 and summary["output_dir"] == str(tmp_path)
    assert json.loads((tmp_path / "summary.json").read_text()) == summary
    assert len((tmp_path / "metrics.jsonl").read_text().splitlines()) == 2
    assert "training grpo on toy" in (tmp_path / "train.log").read_text()
