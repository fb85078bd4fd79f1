"""The examples run as their docstrings say; the example protocol (examples/custom_algorithm.py:
propose, critique, revise) end to end, and its prompts, credit and evaluation with fake policies."""
import dataclasses
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import FakePolicy
from omegaconf import OmegaConf

from envs.base import make_env
from examples.custom_algorithm import CRITIQUE, REVISE, ProposerCritic, ProposerCriticConfig
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.config import ConfigError, RunConfig, load_model_preset
from marl_llm.types import Episode, Turn

ROOT = Path(__file__).resolve().parents[2]
DIFF = "diff/correct-first/correct"  # the example's comparison: after the critique round - before


@pytest.mark.engine
def test_custom_algorithm_plugin_trains(tmp_path):
    cmd = [sys.executable, "-m", "marl_llm.train", "plugins=[examples.custom_algorithm]",
           "hydra.searchpath=[file://examples/conf]", "algo=proposer_critic", "env=math", "model=tiny",
           "rollout.backend=hf", "trainer.steps=2", "trainer.batch_size=2", "algo.group_size=2",
           "rollout.max_new_tokens=8", "trainer.eval_every=2", "trainer.eval_size=4", "trainer.save_every=2",
           "trainer.progress=false", f"trainer.output_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    recs = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [rec["step"] for rec in recs] == [1, 2]
    assert all(math.isfinite(rec[k]) for rec in recs for k in ("reward/mean", "reward/first", "loss"))
    for key in (f"eval/{DIFF}", "eval/correct", "eval/first/correct", "eval/diff/reward-first/reward"):
        assert math.isfinite(recs[-1][key]), key
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert math.isfinite(summary["eval"][DIFF])
    assert (tmp_path / "checkpoints" / "step_2" / "proposer" / "config.json").is_file()
    assert not (tmp_path / "checkpoints" / "step_2" / "critic").exists()  # frozen: never saved


@pytest.mark.engine  # the command line in a subprocess (setup.cfg), though it stops at validation
def test_unknown_plugin_module_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", "plugins=[no_such_module]", "env=toy",
                        f"trainer.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot import 'no_such_module'" in r.stderr


# ---- the example protocol without engines ---------------------------------------------------------
def make_algo(env=None, **kw):
    env = env or make_env({"name": "math", "train_size": 4, "eval_size": 3})
    cfg = ProposerCriticConfig(**kw)
    return ProposerCritic(cfg, env, RunConfig(algo=cfg, env=env.cfg, model=load_model_preset("tiny"))), env


def test_example_yaml_lists_its_dataclass_defaults():
    yaml = OmegaConf.to_container(OmegaConf.load(ROOT / "examples/conf/algo/proposer_critic.yaml"))
    assert yaml == dataclasses.asdict(ProposerCriticConfig())


def test_critique_and_revision_prompts_are_the_protocols_own_on_the_env_hooks():
    algo, env = make_algo()
    algo.validate()
    task = env.tasks("test")[0]
    critique = algo.critique_prompt(task, "3 + 4 = 8 <answer>8</answer>")
    assert critique[0] == {"role": "system", "content": env.cfg.system_prompt}
    assert critique[-1]["content"] == CRITIQUE.format(question=env.question_text(task),
                                                      answer="3 + 4 = 8 <answer>8</answer>")
    revise = algo.revise_prompt(task, "8", "3 + 4 is 7")
    assert revise[-1]["content"] == REVISE.format(question=env.question_text(task), answer="8",
                                                  critique="3 + 4 is 7", answer_instruction=env.instruction(task))
    assert env.instruction(task) and env.instruction(task) not in critique[-1]["content"]
    with pytest.raises(ConfigError, match="question_text"):  # a protocol for answer envs only
        make_algo(env=make_env({"name": "toy"}))[0].validate()


def _chain(i, reward):
    turns = [Turn(agent=a, policy=a, prompt_ids=[1], completion_ids=[i, k], text="") for k, a in
             enumerate(("proposer", "critic", "proposer"))]
    return Episode(task={"id": i // 10}, turns=turns, reward=reward, group=str(i // 10))


def test_credit_is_group_relative_on_the_revision_for_both_proposer_turns():
    algo, _ = make_algo()
    samples = algo.credit([_chain(0, 1.0), _chain(1, 0.0), _chain(10, 1.0), _chain(11, 1.0)])
    assert [s.advantage for s in samples] == [0.5, 0.5, -0.5, -0.5, 0.0, 0.0, 0.0, 0.0]
    assert [s.completion_ids for s in samples[:2]] == [[0, 0], [0, 2]]  # the critic's turn is not trained


def test_protocol_with_fakes_collects_trains_and_evaluates_before_and_after_the_critique():
    algo, env = make_algo(group_size=2)
    gold = {t["question"]: t["answer"] for t in env.train_tasks() + env.tasks("dev") + env.tasks("test")}

    def proposer(p, req, j):  # wrong at first, right once it has read a critique
        if "critique" not in req.messages[-1]["content"]:
            return "<answer>-1</answer>"
        return "<answer>" + next(a for q, a in gold.items() if q in req.messages[-1]["content"]) + "</answer>"

    pol = FakePolicy("proposer", proposer)
    critic = FakePolicy("critic", lambda p, req, j: "The sum is wrong.", trainable=False)
    algo.setup({"proposer": pol, "critic": critic}, TrajectoryBuffer())
    tasks = env.train_tasks()[:2]
    episodes = algo.collect(tasks, step=1)
    assert [len(c) for c in pol.calls] == [2, 4] and [len(c) for c in critic.calls] == [4]  # G answers, 1 each
    assert [r.sampling.n for r in pol.calls[0]] == [2, 2] and critic.calls[0][0].sampling.stop is None
    assert pol.calls[1][0].sampling.stop == env.stop("single")  # the revision is an answer
    assert [e.reward for e in episodes] == [1.0] * 4 and [e.meta["first_reward"] for e in episodes] == [0.0] * 4
    metrics = algo.update(episodes, step=1)
    assert metrics["reward/first"] == 0.0 and len(pol.trained[0][0]) == 8
    out = algo.evaluate(env.tasks("test"))
    assert out["correct"] == 1.0 and out["first/correct"] == 0.0 and out[DIFF] == 1.0
    assert out[f"{DIFF}/n"] == 3 and all(r.sampling.temperature == 0.0 for r in critic.calls[-1])
