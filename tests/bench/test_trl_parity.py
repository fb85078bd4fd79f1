"""bench/trl_parity.py: the task order read from a run folder, the report's agreement math and
curve alignment on synthetic runs, the evaluator's route to a saved model folder; and (slow) TRL
training 2 steps of a tiny random-init model on a fake run folder."""
import json
import math
import statistics
import subprocess
import sys
from pathlib import Path

import pytest

from bench.trl_parity import (EVAL_FILE, STEPS_FILE, SUMMARY_FILE, at_steps, band, eval_command, load_run,
                              marl_curve, parity, prompt_ids_by_step, report, step_tasks, trl_curve)

ROOT = Path(__file__).resolve().parents[2]
TINY_RUN = ["+experiment=cpu_grpo_chain_sum", "model=tiny", "seed=1", "env.train_size=30", "env.eval_size=4",
            "env.dev_size=2", "trainer.eval_size=4", "trainer.batch_size=2", "algo.group_size=2",
            "rollout.max_new_tokens=8", "trainer.steps=3"]


def fake_run(folder: Path, overrides=TINY_RUN, prompt_ids=None) -> Path:
    """A marl_llm run folder as the trainer leaves it, without training: config.yaml,
    train_tasks.jsonl, and buffer.jsonl holding G episodes per task of each step in the
    TaskStream's order (0-based steps, as the trainer logs them). `prompt_ids(task)`: each
    episode's prompt tokens."""
    from bench.trl_step import compose_run
    from envs.base import make_env
    from marl_llm.checkpoint import TaskStream
    from marl_llm.jsonl import write_jsonl
    from marl_llm.trainer import _save_config

    run = compose_run(list(overrides))
    folder.mkdir(parents=True, exist_ok=True)
    _save_config(run, folder)
    tasks = make_env(run.env, seed=run.seed).tasks("train")
    write_jsonl(folder / "train_tasks.jsonl", tasks)
    stream, rows = TaskStream(tasks, run.trainer.batch_size, run.seed), []
    for step in range(run.trainer.steps):
        for t in stream.next_batch():
            turn = {"agent": "single", "prompt_ids": prompt_ids(t) if prompt_ids else None}
            rows += [{"task": t, "group": t["id"], "step": step, "turns": [turn]}] * run.algo.group_size
    write_jsonl(folder / "buffer.jsonl", rows)
    return folder


def test_step_tasks_are_the_buffer_groups_in_task_stream_order(tmp_path):
    run_dir = fake_run(tmp_path / "run", prompt_ids=lambda t: [1, 2, len(t["id"])])
    run = load_run(run_dir)
    steps = step_tasks(run_dir, run)
    assert len(steps) == 3 and all(len(s) == 2 for s in steps)
    buffer = [json.loads(l) for l in (run_dir / "buffer.jsonl").read_text().splitlines()]
    assert [t["id"] for t in steps[0]] == [buffer[0]["group"], buffer[2]["group"]]  # G=2 episodes per group
    assert prompt_ids_by_step(run_dir)[1] == [[1, 2, len(t["id"])] for t in steps[1]]


def test_step_tasks_refuses_a_buffer_out_of_task_stream_order(tmp_path):
    run_dir = fake_run(tmp_path / "run")
    rows = (run_dir / "buffer.jsonl").read_text().splitlines()
    i = next(i for i, l in enumerate(rows) if json.loads(l)["step"] == 1)  # step 2: 2 groups of G=2
    swapped = rows[:i] + rows[i + 2:i + 4] + rows[i:i + 2] + rows[i + 4:]
    (run_dir / "buffer.jsonl").write_text("\n".join(swapped) + "\n")
    with pytest.raises(ValueError, match="step 2 trained on"):
        step_tasks(run_dir, load_run(run_dir))
    (run_dir / "buffer.jsonl").write_text("\n".join(rows[:i]) + "\n")  # one step of three
    with pytest.raises(ValueError, match="holds 1 steps"):
        step_tasks(run_dir, load_run(run_dir))


def _curve(rewards, seed=0, wall=None):
    return {"seed": seed, "steps": list(range(1, len(rewards) + 1)), "reward": rewards, "tokens": [20.0] * len(rewards),
            "correct": [r / 10 for r in rewards], "wall": wall or [10.0 * (i + 1) for i in range(len(rewards))],
            "setup_s": 5.0, "train_s": (wall or [10.0 * len(rewards)])[-1], "test": {}}


def test_parity_interval_over_seed_pairs():
    ours = [_curve([0.2, 0.4]), _curve([0.3, 0.5]), _curve([0.4, 0.6])]     # seed means 0.3, 0.4, 0.5
    trl = [_curve([0.1, 0.3]), _curve([0.3, 0.4]), _curve([0.4, 0.5])]      # 0.2, 0.35, 0.45
    p = parity(ours, trl)
    d = [0.1, 0.05, 0.05]
    half = 4.302652729911275 * statistics.stdev(d) / math.sqrt(3)            # t(0.975, 2 df)
    assert p["diff"].estimate == pytest.approx(statistics.fmean(d))
    assert (p["diff"].low, p["diff"].high) == pytest.approx((statistics.fmean(d) - half, statistics.fmean(d) + half))
    assert p["diff"].n == 3 and p["agree"] is True                            # [-0.005, +0.138] holds 0
    assert p["band_ours"][0] == pytest.approx([0.3, 0.5]) and p["band_ours"][1] == pytest.approx([0.1, 0.1])
    assert p["overlap"] == [True, True] and math.isnan(p["step_correlation"])  # 2 steps: no correlation
    three = parity([_curve([0.1, 0.5, 0.3])], [_curve([0.2, 0.6, 0.4])])
    assert three["step_correlation"] == pytest.approx(1.0)
    apart = parity(ours, [_curve([r - 0.3 for r in c["reward"]]) for c in ours])  # TRL lower by 0.3 everywhere
    assert apart["diff"].estimate == pytest.approx(0.3) and apart["agree"] is False
    assert apart["overlap"] == [False, False]  # means 0.3 apart, sd 0.1 each: the +-1 sd bands do not meet
    assert parity(ours[:1], trl[:1])["agree"] is None                        # one seed: no interval


def test_parity_uses_the_steps_all_curves_have():
    p = parity([_curve([0.5, 0.5, 0.9]), _curve([0.5, 0.5])], [_curve([0.5, 0.5]), _curve([0.5, 0.5, 0.0])])
    assert p["steps"] == 2 and p["ours"] == [0.5, 0.5] and p["diff"].estimate == 0
    assert band([[1.0, 2.0, 3.0], [3.0, 4.0]]) == ([2.0, 3.0], [pytest.approx(math.sqrt(2))] * 2)
    assert at_steps(_curve([0.1, 0.2, 0.3]), 2)["train_s"] == 20.0


def test_marl_curve_counts_training_time_only(tmp_path):
    recs = [{"step": 1, "reward/mean": 0.1, "reward/correct": 0.01, "time/step": 30.0, "time/wall": 114.0},
            {"step": 2, "reward/mean": 0.2, "reward/correct": 0.02, "time/step": 20.0, "time/wall": 134.0},
            {"step": 3, "reward/mean": 0.3, "time/step": 80.0, "time/test": 50.0, "time/save": 6.0,
             "time/wall": 214.0, "test/correct": 0.3, "test/correct/ci_low": 0.2, "test/correct/ci_high": 0.4,
             "test/correct/n": 200}]
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    c = marl_curve(tmp_path)
    assert c["wall"] == [30.0, 50.0, 74.0] and c["train_s"] == 74.0 and c["setup_s"] == 84.0
    assert c["reward"] == [0.1, 0.2, 0.3] and math.isnan(c["correct"][2])
    assert str(c["test"]["correct"]) == "0.30 [0.20, 0.40], n=200"


def _fake_trl(folder: Path, seed: int, rewards, outcomes=None):
    folder.mkdir(parents=True)
    steps = [{"step": i + 1, "reward/mean": r, "reward/correct": r / 10, "wall_s": 40.0 * (i + 1),
              "tokens/completion_mean": 30.0,
              "tasks_match": True, "prompts_match": True} for i, r in enumerate(rewards)]
    (folder / STEPS_FILE).write_text("".join(json.dumps(r) + "\n" for r in steps))
    (folder / SUMMARY_FILE).write_text(json.dumps({"seed": seed, "setup_s": 8.0, "tasks_match": True,
                                                   "prompts_match": True}))
    if outcomes:
        ids, out = outcomes
        (folder / EVAL_FILE).write_text(json.dumps({"correct": 0.5, "correct/ci_low": 0.1, "correct/ci_high": 0.9,
                                                    "correct/n": len(ids)}))
        (folder / "eval_test").mkdir()
        (folder / "eval_test" / "outcomes.json").write_text(json.dumps({"task_ids": ids, "outcomes": out}))


def _fake_marl(folder: Path, seed: int, rewards, outcomes):
    fake_run(folder, [*TINY_RUN[:2], f"seed={seed}", *TINY_RUN[3:]])
    recs = [{"step": i + 1, "reward/mean": r, "reward/correct": r / 10, "time/step": 20.0,
             "tokens/completion_mean": 10.0 * (i + 1),
             "time/wall": 100.0 + 20 * (i + 1)} for i, r in enumerate(rewards)]
    recs[-1].update({"test/correct": 0.5, "test/correct/ci_low": 0.1, "test/correct/ci_high": 0.9, "test/correct/n": 2,
                     "test/base/correct": 0.0, "test/base/correct/ci_low": 0.0, "test/base/correct/ci_high": 0.6,
                     "test/base/correct/n": 2})
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in recs))
    ids, out = outcomes
    (folder / "eval" / "test" / "step_3").mkdir(parents=True)
    (folder / "eval" / "test" / "step_3" / "outcomes.json").write_text(json.dumps({"task_ids": ids, "outcomes": out}))


def test_report_pairs_seeds_and_draws_both_panels(tmp_path):
    ids = ["a", "b"]
    marl, trl = [], []
    for seed, (ours, theirs) in enumerate([([0.2, 0.4, 0.6], [0.2, 0.3, 0.5]), ([0.1, 0.5, 0.3], [0.2, 0.4, 0.4])]):
        _fake_marl(tmp_path / f"m{seed}", seed, ours,
                   (ids, {"correct": [1.0, 0.0], "lenient/correct": [1.0, 1.0], "base/correct": [0.0, 0.0],
                          "lenient/base/correct": [0.0, 1.0]}))
        _fake_trl(tmp_path / f"t{seed}", seed, theirs, (ids, {"correct": [0.0, 0.0], "lenient/correct": [1.0, 0.0]}))
        marl.append(str(tmp_path / f"m{seed}"))
        trl.append(str(tmp_path / f"t{seed}"))
    fig = tmp_path / "fig" / "parity.png"
    text = report(trl, marl, str(fig))
    assert fig.stat().st_size > 10_000
    assert "| 0 | 0.400 | 0.333 | +0.067 |" in text and "| 1 | 0.300 | 0.333 | -0.033 |" in text
    assert "n=2 (95% t-interval, 1 degrees of freedom)" in text
    assert "| mean ± sd | 0.350 ± 0.071 | 0.333 ± 0.000 | +0.017 [" in text
    # the run's untrained and trained, TRL's; paired over the 2 tasks: marl_llm - TRL, each - untrained
    assert ("| 0 | strict | 0.000 [0.000, 0.600], n=2 | 0.500 [0.100, 0.900], n=2 | 0.500 [0.100, 0.900], n=2 | "
            "+0.500 [-5.853, +6.853], n=2 | +0.500 [-5.853, +6.853], n=2 | +0.000 [+0.000, +0.000], n=2 |") in text
    assert ("| mean ± sd over seeds | lenient | 0.500 ± 0.000 | 1.000 ± 0.000 | 0.500 ± 0.000 | "
            "+0.500 [+0.500, +0.500], n=2 | +0.500 [+0.500, +0.500], n=2 | +0.000 [+0.000, +0.000], n=2 |") in text
    assert "| pooled over (seed, task) | lenient | 0.500 | 1.000 | 0.500 | +0.500 [" in text  # 4 (seed, task) pairs
    assert "2.00x" in text  # steps/s: TRL 40 s per step, marl_llm 20 s
    assert "| 20.0 / 30.0 |" in text and "marl_llm minus TRL, -10.0 [-10.0, -10.0], n=2" in text  # reply tokens
    with pytest.raises(ValueError, match="pair them in the same order"):
        report(trl[::-1], marl, None)


def test_the_evaluator_scores_the_model_folder_of_a_folder_without_checkpoint(tmp_path):
    """The route `score` takes: the run's config.yaml in DIR, no checkpoint there, the model given
    by model.source=hf model.path=...: marl_llm.evaluate composes exactly that (no engine starts)."""
    from marl_llm.config import validate
    from marl_llm.evaluate import _checkpoint, _compose, _parse

    out = fake_run(tmp_path / "trl")
    (out / "model").mkdir()
    cmd = eval_command(out, out / "model")
    assert cmd[1:3] == ["-m", "marl_llm.evaluate"]
    special, overrides = _parse(cmd[3:])
    run = validate(_compose(special, overrides))
    assert _checkpoint(special) is None  # nothing of a training run's checkpoints is loaded
    assert (run.model.source, run.model.path) == ("hf", str((out / "model").resolve()))
    assert run.algo.eval_baselines == [] and special["out"] == str(out.resolve() / EVAL_FILE)
    assert run.trainer.eval_size == 4 and run.seed == 1 and run.env.task == "chain_sum"


@pytest.mark.slow
def test_trl_trains_two_steps_of_a_fake_run_and_saves_the_model(tmp_path):
    from transformers import AutoTokenizer

    from envs.base import make_env
    from marl_llm.config import ModelConfig
    from marl_llm.models import resolve_model

    from bench.trl_step import compose_run
    tok = AutoTokenizer.from_pretrained(resolve_model(ModelConfig(name="tiny", source="tiny")))
    run = compose_run(TINY_RUN)
    env = make_env(run.env, seed=run.seed)

    def prompt_ids(task):  # the prompt tokens marl_llm's rollout would have logged
        return list(tok.apply_chat_template([env.prompt(task, "single")], add_generation_prompt=True, tokenize=True,
                                            return_dict=True)["input_ids"][0])

    run_dir = fake_run(tmp_path / "run", prompt_ids=prompt_ids)
    out = tmp_path / "trl"
    r = subprocess.run([sys.executable, "-m", "bench.trl_parity", "--run", str(run_dir), "--out", str(out),
                        "--steps", "2", "--no-test"], cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l) for l in (out / STEPS_FILE).read_text().splitlines()]
    assert [s["step"] for s in steps] == [1, 2]
    for s in steps:
        assert s["tasks_match"] is True and s["prompts_match"] is True, s
        assert s["n_samples"] == 4 and 0 <= s["reward/mean"] <= 1 and "reward/correct" in s
        assert s["trl/reward"] == pytest.approx(s["reward/mean"], abs=1e-6)  # TRL's own logged mean
    assert 0 < steps[0]["wall_s"] < steps[1]["wall_s"]
    summary = json.loads((out / SUMMARY_FILE).read_text())
    assert summary["seed"] == 1 and summary["loss_temperature"] == 1.0 and summary["sampling_temperature"] == 0.8
    assert summary["stop"] == ["</answer>"] and summary["generation"].startswith("model.generate")
    assert summary["max_rss_gb"] > 0.1 and summary["max_load1"] >= 0
    assert (out / "model" / "tokenizer.json").is_file() and (out / "model" / "model.safetensors").is_file()
    saved = json.loads((out / "model" / "config.json").read_text())
    base = json.loads(Path(resolve_model(ModelConfig(name="tiny", source="tiny")), "config.json").read_text())
    assert saved["rope_theta"] == base["rope_theta"] and saved["use_cache"] is True  # vLLM reads these
    c = trl_curve(out)
    assert c["train_s"] == steps[-1]["wall_s"] and c["test"] == {} and c["checks"]["prompts_match"] is True
