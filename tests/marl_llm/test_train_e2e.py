"""End to end through the real engines: Ray actors, vLLM rollout, 2 DeepSpeed ZeRO-3 ranks.

The CLI is run exactly as a user runs it; the run folder is then checked against the contract
(metrics, buffer, config, checkpoints loadable by transformers), resumed, and evaluated.
"""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine

TRAIN = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny",
         "learner.num_ranks=2", "rollout.backend=vllm", "trainer.batch_size=2", "algo.group_size=4",
         "rollout.max_new_tokens=16", "trainer.save_every=1", "trainer.progress=false"]


def run(cmd, timeout=1200):
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout)
    assert r.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    return r


def records(out: Path):
    return [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("grpo")
    run(TRAIN + ["trainer.steps=2", f"trainer.output_dir={out}"])
    return out


def test_run_folder_contract(run_dir):
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2]
    for r in recs:
        for key in ("reward/mean", "loss", "time/generate", "time/train", "time/sync", "time/step"):
            assert isinstance(r[key], float), key
    assert (run_dir / "config.yaml").is_file()
    assert len((run_dir / "buffer.jsonl").read_text().splitlines()) == 2 * 2 * 4  # steps x tasks x G
    episode = json.loads((run_dir / "buffer.jsonl").read_text().splitlines()[0])
    turn = episode["turns"][0]
    assert len(turn["completion_ids"]) == len(turn["logprobs"]) > 0
    log = (run_dir / "train.log").read_text()
    assert "vllm" in log.lower() and "DeepSpeed ZeRO-3" in log and "2 ranks" in log


def test_checkpoint_loads_with_from_pretrained(run_dir):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    ckpt = run_dir / "checkpoints" / "step_2" / "policy"
    model = AutoModelForCausalLM.from_pretrained(str(ckpt))
    tok = AutoTokenizer.from_pretrained(str(ckpt))
    ids = tok("hello there", return_tensors="pt").input_ids
    with torch.no_grad():
        assert torch.isfinite(model(ids).logits).all()
    state = json.loads((run_dir / "checkpoints" / "step_2" / "trainer_state.json").read_text())
    assert state["step"] == 2 and state["buffer_total"] == 16 and state["data"]["pos"] == 4


def test_resume_continues_and_appends(run_dir):
    run(TRAIN + ["trainer.steps=3", "trainer.resume=true", f"trainer.output_dir={run_dir}"])
    recs = records(run_dir)
    assert [r["step"] for r in recs] == [1, 2, 3]
    assert len((run_dir / "buffer.jsonl").read_text().splitlines()) == 3 * 2 * 4
    state = json.loads((run_dir / "checkpoints" / "step_3" / "trainer_state.json").read_text())
    assert state["step"] == 3 and state["data"]["pos"] == 6
    # the learner resumed its optimiser: DeepSpeed's global step counts on from the checkpoint
    assert recs[-1]["global_step"] == 3


def test_fresh_run_refuses_to_overwrite(run_dir):
    r = subprocess.run(TRAIN + ["trainer.steps=1", f"trainer.output_dir={run_dir}"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode != 0 and "trainer.resume=true" in r.stderr


def test_evaluate_run_dir(run_dir):
    out = run_dir / "eval.json"
    run([sys.executable, "-m", "marl_llm.evaluate", f"run_dir={run_dir}", "trainer.eval_size=4",
         "rollout.backend=hf", f"out={out}"])
    result = json.loads(out.read_text())
    assert result["n"] == 4 and 0.0 <= result["reward"] <= 1.0
    latest = max((run_dir / "checkpoints").glob("step_*"), key=lambda p: int(p.name.split("_")[1]))
    assert result["checkpoint"] == str(latest)


def test_evaluate_baseline_init_pairs_checkpoint_and_initial_model(run_dir):
    out = run_dir / "eval_init.json"
    r = run([sys.executable, "-m", "marl_llm.evaluate", f"run_dir={run_dir}", "baseline=init", "trainer.eval_size=4",
             "rollout.backend=hf", f"out={out}"])
    result = json.loads(out.read_text())
    # the checkpoint, the frozen untrained base next to it, and the rebuilt initial policy: all on 4 tasks
    assert result["n"] == 4 and result["reward/n"] == 4 and result["init/reward/n"] == 4
    assert result["diff/reward-base/reward/n"] == 4 and result["diff/reward-init/reward/n"] == 4
    # the initial policy is the untrained model: greedy, the same tasks, so it scores what the base does
    assert result["init/reward"] == pytest.approx(result["base/reward"])
    assert "reward: after - before = " in r.stdout and "reward - base/reward = " in r.stdout
    summary = json.loads((run_dir / "summary.json").read_text())
    assert any(line.startswith("reward - base/reward = ") for line in summary["comparisons"])


def test_worked_examples_reach_the_engines_in_training_and_evaluation(tmp_path):
    """`env.few_shot`: the rollout engine's prompt token ids (the buffer) and the saved evaluation
    prompts both carry the solved train task, through vLLM and the DeepSpeed learner."""
    from transformers import AutoTokenizer

    from envs.base import make_env
    out = tmp_path / "shots"
    reply = "{metadata[expression]} = {answer}\n<answer>{answer}</answer>"
    run([sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=reasoning_gym", "env.task=chain_sum",
         "env.train_size=20", "env.eval_size=2", "env.few_shot=1", f"env.few_shot_reply='{reply}'", "model=tiny",
         "rollout.backend=vllm", "trainer.batch_size=2", "algo.group_size=2", "rollout.max_new_tokens=8",
         "trainer.steps=1", "trainer.eval_size=2", "trainer.progress=false", f"trainer.output_dir={out}"])
    env = make_env({"name": "reasoning_gym", "task": "chain_sum", "train_size": 20, "eval_size": 2, "few_shot": 1,
                    "few_shot_reply": reply})
    example = env.example_reply(env.train_tasks()[0])
    tok = AutoTokenizer.from_pretrained(str(out / "checkpoints" / "step_1" / "policy"))
    episode = json.loads((out / "buffer.jsonl").read_text().splitlines()[0])
    assert example in tok.decode(episode["turns"][0]["prompt_ids"])
    saved = (out / "eval" / "test" / "step_1" / "replies" / "correct.jsonl").read_text().splitlines()
    assert len(saved) == 2 and all(json.loads(l)["prompt"][2] == {"role": "assistant", "content": example}
                                   for l in saved)
