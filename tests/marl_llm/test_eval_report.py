"""How evaluation numbers are printed: `python -m marl_llm.evaluate`'s table and the run summary
(no engines)."""
from __future__ import annotations

import logging

import pytest

from algorithms.base import outcome_metrics
from marl_llm.config import ConfigError, RunConfig, TrainerConfig
from marl_llm.evaluate import _checkpoint, print_table
from marl_llm.stats import diff_key, interval_metrics, paired_difference
from marl_llm.trainer import Trainer

AFTER = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
BEFORE = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]


def test_table_prints_intervals_comparisons_and_after_minus_before(capsys):
    result = {"algo": "grpo", "n": 10, **outcome_metrics({"correct": AFTER, "base/correct": BEFORE},
                                                         [("correct", "base/correct")]),
              "tokens": 12.5, **{f"init/{k}": v for k, v in outcome_metrics({"correct": BEFORE}).items()},
              **interval_metrics(diff_key("correct", "init/correct"), paired_difference(AFTER, BEFORE))}
    print_table(result)
    out = capsys.readouterr().out.splitlines()
    assert "correct       0.70 [0.40, 0.89], n=10" in out
    assert "init/correct  0.30 [0.11, 0.60], n=10" in out
    assert "tokens        12.5000" in out and "algo          grpo" in out
    assert not any("ci_low" in line or line.startswith("diff/") for line in out)
    assert out[-3:] == ["paired comparisons (95% intervals):",
                        "  correct - base/correct = +0.40 [+0.03, +0.77], n=10",
                        "correct: after - before = +0.40 [+0.03, +0.77], n=10"]


@pytest.mark.parametrize("special, needle", [
    ({"baseline": "final"}, "baseline='final' is not allowed; choose one of ['init']"),
    ({"baseline": "init"}, "baseline=init needs run_dir="),
])
def test_bad_baseline_is_named(special, needle):
    with pytest.raises(ConfigError) as e:
        _checkpoint(special)
    assert needle in str(e.value)


def test_run_dir_with_another_env_keeps_the_run_and_swaps_the_env(tmp_path):
    from omegaconf import OmegaConf
    from marl_llm.evaluate import _compose
    OmegaConf.save(OmegaConf.create({"algo": {"name": "grpo"}, "env": {"name": "math", "difficulty": 1},
                                     "rollout": {"max_new_tokens": 96}}), tmp_path / "config.yaml")
    cfg = _compose({"run_dir": str(tmp_path)}, ["env=reasoning_gym", "env.eval_size=50"])
    assert cfg.env.name == "reasoning_gym" and cfg.env.eval_size == 50 and "difficulty" not in cfg.env
    assert cfg.algo.name == "grpo" and cfg.rollout.max_new_tokens == 96
    with pytest.raises(ConfigError, match="env='nope' does not exist; choose one of .*reasoning_gym"):
        _compose({"run_dir": str(tmp_path)}, ["env=nope"])
    with pytest.raises(ConfigError, match="only env=<name> and key=value overrides"):
        _compose({"run_dir": str(tmp_path)}, ["algo=mlpo"])


def test_run_dir_on_another_family_drops_the_settings_it_lacks(tmp_path):
    from omegaconf import OmegaConf
    from marl_llm.evaluate import _compose
    OmegaConf.save(OmegaConf.create({"env": {"name": "reasoning_gym", "task": "basic_arithmetic", "few_shot": 2,
                                             "task_config": {"max_digits": 2, "operators": ["+"]}}}),
                   tmp_path / "config.yaml")
    cfg = _compose({"run_dir": str(tmp_path)}, ["env.task=products", "~env.task_config.operators"])
    assert cfg.env.task == "products" and dict(cfg.env.task_config) == {"max_digits": 2} and cfg.env.few_shot == 2
    with pytest.raises(ConfigError, match=r"~env.task_config.operatorz: the run's config has no key"):
        _compose({"run_dir": str(tmp_path)}, ["~env.task_config.operatorz"])


def test_run_dir_overrides_read_values_as_a_training_command_line_does(tmp_path):
    """With run_dir= the overrides' values follow Hydra's grammar, as on `train`: a quoted "\\n"
    stays two characters in both, a mapping set with ++ merges, numbers and lists are typed."""
    from omegaconf import OmegaConf
    from marl_llm.evaluate import _compose
    OmegaConf.save(OmegaConf.create({"env": {"name": "reasoning_gym", "task": "chain_sum", "task_config": {"max_digits": 2}},
                                     "learner": {"lr": 3e-5}}), tmp_path / "config.yaml")
    args = ['env.few_shot_reply="{answer}\\n<answer>{answer}</answer>"', "++env.task_config={min_terms: 2}",
            "learner.lr=1e-5", "+env.extra=[1, 2]"]
    cfg = _compose({"run_dir": str(tmp_path)}, args)
    train = _compose({}, ["env=reasoning_gym", args[0]])
    assert cfg.env.few_shot_reply == train.env.few_shot_reply == "{answer}\\n<answer>{answer}</answer>"
    assert dict(cfg.env.task_config) == {"max_digits": 2, "min_terms": 2} and cfg.learner.lr == 1e-5
    assert list(cfg.env.extra) == [1, 2]
    with pytest.raises(ConfigError, match=r"^with run_dir=: .*'\[1,'"):  # bad syntax: Hydra's message
        _compose({"run_dir": str(tmp_path)}, ["env.extra=[1,"])


def test_baseline_init_needs_a_checkpoint(tmp_path):
    with pytest.raises(ConfigError, match="has no checkpoint; baseline=init"):
        _checkpoint({"run_dir": str(tmp_path), "baseline": "init"})


def _evaluation(key, after, before):
    """A metrics record's evaluation block: MLPO-style metrics with intervals under `key/`."""
    return {f"{key}/{k}": v for k, v in outcome_metrics({"acc/final": after, "acc/untrained_final": before},
                                                         [("acc/final", "acc/untrained_final")]).items()}


def test_summary_reports_the_test_evaluation_with_intervals_comparisons_and_wall_clock(tmp_path, caplog):
    trainer = Trainer(RunConfig(trainer=TrainerConfig(output_dir=str(tmp_path))))
    # the last step's dev evaluation (eval/) and the test evaluation (test/): the test one is reported
    last = {"step": 2, "reward/mean": 0.5, **_evaluation("eval", BEFORE, BEFORE), **_evaluation("test", AFTER, BEFORE)}
    with caplog.at_level(logging.INFO, logger="marl_llm.trainer"):
        s = trainer._summary({"step": 1, "reward/mean": 0.25}, last)
    assert s["train"] == {"reward/mean": {"first": 0.25, "last": 0.5}} and s["wall_clock_s"] >= 0
    assert s["reported"] == "test"
    assert s["intervals"] == {"acc/final": "0.70 [0.40, 0.89], n=10", "acc/untrained_final": "0.30 [0.11, 0.60], n=10"}
    assert s["comparisons"] == ["acc/final - acc/untrained_final = +0.40 [+0.03, +0.77], n=10"]
    assert s["test"]["acc/final"] == 0.7 and s["eval"]["acc/final"] == 0.3 and s["eval"]["acc/final/n"] == 10
    assert "final evaluation (test split)" in caplog.text
    assert "acc/final - acc/untrained_final = +0.40" in caplog.text


def test_summary_of_a_run_without_any_evaluation_says_how_to_score_it(tmp_path, caplog):
    trainer = Trainer(RunConfig(trainer=TrainerConfig(output_dir=str(tmp_path), test=False)))
    with caplog.at_level(logging.INFO, logger="marl_llm.trainer"):
        s = trainer._summary({"step": 1}, {"step": 2})
    assert s["reported"] is None and s["comparisons"] == []
    assert "final evaluation" not in caplog.text
    assert f"python -m marl_llm.evaluate run_dir={tmp_path} split=dev" in caplog.text


def test_summary_without_a_test_evaluation_reports_the_last_dev_one(tmp_path):
    trainer = Trainer(RunConfig(trainer=TrainerConfig(output_dir=str(tmp_path), eval_every=1, test=False)))
    s = trainer._summary({"step": 1}, {"step": 2, **_evaluation("eval", AFTER, BEFORE)})
    assert (s["reported"], s["test"]) == ("dev", {})
    assert s["comparisons"] == ["acc/final - acc/untrained_final = +0.40 [+0.03, +0.77], n=10"]
