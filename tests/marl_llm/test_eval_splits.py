"""Which split each evaluation scores (no engines): the trainer's periodic evaluation on dev
(`eval/...`, eval/dev/step_N), one test evaluation after the last step (`test/...`, eval/test/step_N,
the summary's reported numbers); `python -m marl_llm.evaluate split=dev|test` (test by default);
the pre-flight check warns about an empty split only where it will be evaluated."""
from __future__ import annotations

import json
import logging

import pytest

import marl_llm.trainer as trainer_module
from algorithms.grpo import GRPOConfig
from envs.base import make_env
from envs.toy import ToyConfig
from marl_llm.config import ConfigError, RunConfig, TrainerConfig
from marl_llm.eval_store import find_outcomes, load_outcomes
from marl_llm.evaluate import _out_path, _parse, evaluate_run
from marl_llm.trainer import Trainer
from marl_llm.types import Episode


# ---- the trainer: dev every eval_every steps, test once after the last ------------------------------
class FakeAlgo:
    """What `Trainer.fit` calls, with no policies: each evaluation records its task ids and scores
    its number (1, 2, ...) on every task, so a metric tells which evaluation it came from."""

    def __init__(self):
        self.evaluated: list[list[str]] = []
        self.eval_outcomes: dict[str, list[float]] = {}

    def policy_specs(self):
        return []

    def setup(self, policies, buffer, timer=None):
        pass

    def prepare(self, tasks):
        return tasks

    def collect(self, tasks, step):
        return [Episode(task=t, reward=1.0, step=step) for t in tasks]

    def update(self, episodes, step):
        return {"reward/mean": 1.0}

    def evaluate(self, tasks):
        self.evaluated.append([t["id"] for t in tasks])
        self.eval_outcomes = {"reward": [float(len(self.evaluated))] * len(tasks)}
        return {"reward": float(len(self.evaluated))}

    def state_dict(self):
        return {}


class FakeCluster:
    def __init__(self, cfg):
        pass

    def cpus_needed(self, specs, run):
        return 1

    def start(self, cpus, engine_log=None):
        pass

    def build_policies(self, specs, run, inits):
        return {}

    def shutdown(self, policies):
        pass


def fit(tmp_path, monkeypatch, algo=None, **trainer):
    run = RunConfig(algo=GRPOConfig(), env=ToyConfig(train_size=40, eval_size=10), seed=1,
                    trainer=TrainerConfig(**{"steps": 4, "batch_size": 2, "save_every": 0, "eval_size": 3,
                                             "output_dir": str(tmp_path), "loggers": [], "progress": False,
                                             "report": False, **trainer}))
    env, algo = make_env(run.env, seed=run.seed), algo or FakeAlgo()
    tmp_path.mkdir(parents=True, exist_ok=True)  # what the pre-flight check (replaced here) does
    monkeypatch.setattr(trainer_module, "check_run", lambda run, output_dir: (env, algo))
    monkeypatch.setattr(trainer_module, "Cluster", FakeCluster)
    summary = Trainer(run).fit()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    return env, algo, summary, records


def test_dev_every_eval_every_steps_and_test_once_after_the_last(tmp_path, monkeypatch):
    env, algo, summary, records = fit(tmp_path, monkeypatch, eval_every=2)
    dev, test = ([t["id"] for t in env.tasks(split)[:3]] for split in ("dev", "test"))
    assert algo.evaluated == [dev, dev, test]  # step 2: dev; step 4: dev, then test
    assert [{k for k in r if k.startswith(("eval/", "test/"))} for r in records] == \
        [set(), {"eval/reward"}, set(), {"eval/reward", "test/reward"}]
    assert (records[-1]["eval/reward"], records[-1]["test/reward"]) == (2.0, 3.0)
    assert "time/test" in records[-1]
    for split, step, ids in (("dev", 2, dev), ("dev", 4, dev), ("test", 4, test)):
        assert load_outcomes(tmp_path / "eval" / split / f"step_{step}")[0] == ids
    assert find_outcomes(tmp_path).parent == tmp_path / "eval" / "test" / "step_4"
    assert (summary["eval"], summary["test"], summary["reported"]) == ({"reward": 2.0}, {"reward": 3.0}, "test")
    assert json.loads((tmp_path / "summary.json").read_text())["test"] == {"reward": 3.0}


def test_eval_every_zero_evaluates_test_only_and_test_false_nothing(tmp_path, monkeypatch):
    env, algo, summary, records = fit(tmp_path / "a", monkeypatch)  # the defaults: eval_every=0, test=true
    assert algo.evaluated == [[t["id"] for t in env.tasks("test")[:3]]]
    assert not (tmp_path / "a" / "eval" / "dev").exists()
    assert summary["test"] == {"reward": 1.0} and summary["eval"] == {} and "eval/reward" not in records[-1]
    _, algo, summary, _ = fit(tmp_path / "b", monkeypatch, test=False)
    assert algo.evaluated == [] and summary["reported"] is None and summary["comparisons"] == []


class FailingEvalAlgo(FakeAlgo):
    def evaluate(self, tasks):
        raise RuntimeError("generate failed on rollout worker 0 of policy 'base': OutOfMemoryError")


def test_a_failed_final_evaluation_keeps_the_checkpoint_and_the_steps_metrics(tmp_path, monkeypatch, caplog):
    """The last step's checkpoint is written before its evaluation, so an evaluation that fails (an
    engine killed for memory) loses no training; the error names the command that scores it."""
    with caplog.at_level(logging.ERROR, logger="marl_llm.trainer"), pytest.raises(RuntimeError, match="OutOfMemory"):
        fit(tmp_path, monkeypatch, algo=FailingEvalAlgo(), save_every=4)
    assert (tmp_path / "checkpoints" / "step_4").is_dir()
    records = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == [1, 2, 3, 4] and records[-1]["reward/mean"] == 1.0
    assert f"the checkpoint of step 4 is saved: score it with python -m marl_llm evaluate run_dir={tmp_path}" in caplog.text
    # resumed, nothing is trained again and nothing starts; the same command is named
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="marl_llm.trainer"):
        _, algo, summary, _ = fit(tmp_path, monkeypatch, save_every=4, resume=True)
    assert algo.evaluated == [] and summary["checkpoint"] == str(tmp_path / "checkpoints" / "step_4")
    assert f"The final evaluation: python -m marl_llm.evaluate run_dir={tmp_path}" in caplog.text


# ---- python -m marl_llm.evaluate split=dev|test ----------------------------------------------------
def test_evaluate_takes_split_and_names_its_output(tmp_path):
    special, overrides = _parse(["run_dir=R", "split=dev", "trainer.eval_size=4"])
    assert special == {"run_dir": "R", "split": "dev"} and overrides == ["trainer.eval_size=4"]
    ckpt = tmp_path / "checkpoints" / "step_6"
    assert _out_path({"run_dir": str(tmp_path)}, ckpt, "test") == tmp_path / "eval_step_6.json"
    assert _out_path({"run_dir": str(tmp_path)}, ckpt, "dev") == tmp_path / "eval_step_6_dev.json"
    assert _out_path({"run_dir": str(tmp_path)}, None, "dev") == tmp_path / "eval_init_dev.json"


@pytest.mark.parametrize("split", ["train", "eval", "Test"])
def test_evaluate_refuses_another_split_before_anything_starts(tmp_path, split):
    with pytest.raises(ConfigError, match=rf"split='{split}' is not allowed; choose one of \['dev', 'test'\]"):
        evaluate_run({"run_dir": str(tmp_path), "split": split}, [])


# ---- pre-flight: an empty split warns only where it is evaluated -----------------------------------
@pytest.mark.parametrize("trainer, warned", [
    ([], ["test"]),                                        # defaults: test after the last step
    (["trainer.eval_every=2"], ["dev", "test"]),
    (["trainer.eval_every=2", "trainer.test=false"], ["dev"]),
    (["trainer.test=false"], []),
])
def test_preflight_warns_about_the_evaluated_splits_that_are_empty(caplog, trainer, warned):
    from hydra import compose, initialize_config_dir

    from marl_llm.config import conf_dir, validate
    from marl_llm.preflight import check_run
    overrides = ["algo=grpo", "env=toy", "model=tiny", "env.train_size=4", "env.eval_size=0", *trainer]
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        run = validate(compose(config_name="config", overrides=overrides))
    with caplog.at_level(logging.WARNING, logger="marl_llm.preflight"):
        check_run(run)
    assert [s for s in ("dev", "test") if f"env='toy' has no {s} tasks to evaluate" in caplog.text] == warned
