"""Bad input stops before any engine starts: one `error:` line, exit status 2, in seconds.

Each CLI case runs the real entry point in a subprocess, as a user runs it; "no engine started"
is asserted by the time it takes (Ray + vLLM + DeepSpeed take 25 s or more here) and by the
absence of the engines' start-up lines. They are marked `engine` all the same (setup.cfg): the
unit tier runs no command line in a subprocess.
"""
import json
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from hydra import compose, initialize_config_dir

from marl_llm.config import RolloutConfig, conf_dir, validate
from marl_llm.preflight import PreflightError, check_run

ROOT = Path(__file__).resolve().parents[2]
TRAIN = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=math", "model=tiny", "trainer.steps=1"]
FAST_S = 20.0  # generous on 2 shared cores; an engine start alone takes longer


def write_jsonl(path: Path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def cli(cmd, env_extra=None):
    env = {**os.environ, **(env_extra or {})}
    t0 = time.time()
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    return r, time.time() - t0


def assert_user_error(r, seconds, *needles, logs_on_stderr=False):
    """Exit 2 and one `error:` line; stderr holds nothing else unless the tool logs there (evaluate)."""
    err = r.stderr.strip().splitlines()
    assert r.returncode == 2, f"rc={r.returncode}\n{r.stderr[-3000:]}"
    if logs_on_stderr:
        assert [l for l in err if l.startswith("error: ")] == err[-1:], r.stderr[-3000:]
        err = err[-1:]
    assert len(err) == 1 and err[0].startswith("error: "), r.stderr[-3000:]
    assert "Traceback" not in r.stderr + r.stdout
    for n in needles:
        assert n in err[0], (n, err[0])
    assert seconds < FAST_S, seconds
    assert "Ray started" not in r.stdout and "learner group" not in r.stdout


@pytest.fixture
def data(tmp_path):
    d = tmp_path / "data"
    d.mkdir()
    good = [{"question": f"What is {i} + 1?", "answer": str(i + 1)} for i in range(8)]
    write_jsonl(d / "good.jsonl", good)
    (d / "malformed.jsonl").write_text('{"question": "1+1?", "answer": "2"}\n{"question": "2+2?"\n')
    (d / "empty.jsonl").write_text("")
    write_jsonl(d / "no_answer.jsonl", [{"question": "1+1?", "solution": "2"}] * 4)
    long_q = "Count the apples. " * 400  # ~2000 tokens: more than model.max_model_len=1024
    write_jsonl(d / "long.jsonl", [{"question": long_q, "answer": "1"}] * 4)
    write_jsonl(d / "mixed.jsonl", good + [{"question": long_q, "answer": "1"}] * 3)
    return d


@pytest.mark.engine
@pytest.mark.parametrize("case, needles", [
    ("missing.jsonl", ["does not exist", "give an existing"]),
    ("malformed.jsonl", ["line 2 is not valid JSON", "one JSON object per line"]),
    ("empty.jsonl", ["is empty", "at least one task"]),
    ("no_answer.jsonl", ["'answer'", "Columns that exist: ['question', 'solution']",
                         "env.data.fields.answer=solution"]),
    ("long.jsonl", [f"none of the 4 tasks has a prompt that fits in {1024 - RolloutConfig().max_new_tokens} tokens",
                    "env.data.long_prompts=truncate"]),
])
def test_train_bad_data(data, tmp_path, case, needles):
    r, s = cli(TRAIN + [f"env.data.path={data / case}", "env.data.eval_size=0",
                        f"trainer.output_dir={tmp_path / 'out'}"])
    assert_user_error(r, s, f"env.data.path={str(data / case)!r}" if case != "long.jsonl" else "train split",
                      *needles)


@pytest.mark.engine
def test_train_missing_model_folder(tmp_path):
    r, s = cli(TRAIN + ["model.source=hf", "model.path=/no/such/folder", f"trainer.output_dir={tmp_path}"])
    assert_user_error(r, s, "model.path='/no/such/folder' is not a folder", "Hub id")


@pytest.mark.engine
def test_train_model_folder_without_config(tmp_path):
    (tmp_path / "m").mkdir()
    r, s = cli(TRAIN + ["model.source=hf", f"model.path={tmp_path / 'm'}", f"trainer.output_dir={tmp_path / 'o'}"])
    assert_user_error(r, s, "holds no config.json")


@pytest.mark.engine
def test_train_hub_id_while_offline(tmp_path):
    r, s = cli(TRAIN + ["model.source=hf", "model.path=nobody/no-such-model", f"trainer.output_dir={tmp_path}"],
               env_extra={"HF_HUB_OFFLINE": "1"})
    assert_user_error(r, s, "'nobody/no-such-model' is a Hugging Face Hub id", "HF_HUB_OFFLINE=1",
                      "local model folder")


@pytest.mark.engine
def test_train_unwritable_output_dir(tmp_path):
    (tmp_path / "a_file").write_text("")
    r, s = cli(TRAIN + [f"trainer.output_dir={tmp_path / 'a_file' / 'run'}"])
    assert_user_error(r, s, "trainer.output_dir=", "is not writable", "choose a folder")


@pytest.mark.engine
@pytest.mark.skipif(os.geteuid() == 0, reason="root writes through permission bits")
def test_train_read_only_output_dir(tmp_path):
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    r, s = cli(TRAIN + [f"trainer.output_dir={ro / 'run'}"])
    assert_user_error(r, s, "is not writable")


@pytest.mark.engine
def test_train_existing_checkpoints_without_resume(tmp_path):
    (tmp_path / "checkpoints" / "step_2").mkdir(parents=True)
    (tmp_path / "checkpoints" / "step_2" / "trainer_state.json").write_text("{}")
    r, s = cli(TRAIN + [f"trainer.output_dir={tmp_path}"])
    assert_user_error(r, s, "already holds checkpoints (step_2)", "trainer.resume=true")


@pytest.mark.engine
@pytest.mark.parametrize("args, needles", [
    (["algo=nope"], ["Could not find 'algo/nope'", "grpo"]),
    (["trainer.stepz=3"], ["trainer.stepz"]),
    (["rollout.max_new_tokens=-1"], ["rollout.max_new_tokens=-1 must be > 0"]),
    (["env.data.long_prompts=keep"], ["env.data.long_prompts='keep' is not allowed", "'truncate'"]),
])
def test_train_bad_config(tmp_path, args, needles):
    r, s = cli(TRAIN + [f"trainer.output_dir={tmp_path}"] + args)
    assert_user_error(r, s, *needles)


@pytest.mark.engine
def test_debug_switch_shows_the_traceback(tmp_path):
    r, _ = cli(TRAIN + ["env.data.path=/no/such.jsonl", f"trainer.output_dir={tmp_path}"],
               env_extra={"MARL_LLM_DEBUG": "1"})
    assert r.returncode != 0 and "Traceback" in r.stderr and "DataNotFound" in r.stderr


@pytest.mark.engine
def test_evaluate_bad_input(data, tmp_path):
    base = [sys.executable, "-m", "marl_llm.evaluate"]
    model = ["algo=grpo", "env=math", "model=tiny"]
    (tmp_path / "a_file").write_text("")
    for args, needle in [([f"run_dir={tmp_path / 'none'}"], "has no config.yaml"),
                         (model + [f"env.data.path={data / 'no_answer.jsonl'}"], "column(s) not found"),
                         (model + ["model.source=hf", "model.path=/no/such/folder"], "is not a folder"),
                         (model + ["algo.nope=1"], "algo.nope"),
                         (model + [f"out={tmp_path / 'a_file' / 'e.json'}"], "is not writable")]:
        r, s = cli(base + args + ([] if any(a.startswith("out=") for a in args) else [f"out={tmp_path / 'e.json'}"]))
        assert_user_error(r, s, needle, logs_on_stderr=True)


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_envcheck_bad_input(data):
    base = [sys.executable, "-m", "marl_llm.envcheck", "env=math"]
    for args, needle in [([f"env.data.path={data / 'malformed.jsonl'}"], "line 2 is not valid JSON"),
                         ([f"env.data.path={data / 'empty.jsonl'}"], "is empty"),
                         ([f"env.data.path={data / 'no_answer.jsonl'}"], "column(s) not found"),
                         (["env.difficultyy=3"], "difficultyy"),
                         (["seed=x"], "seed='x' is not an integer")]:
        r, s = cli(base + args)
        assert_user_error(r, s, needle)


# ---- over-long prompts: dropped at load with a logged count, or truncated -------------------------
def run_config(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return validate(compose(config_name="config", overrides=["algo=grpo", "env=math", "model=tiny",
                                                                  *overrides]))


def test_long_prompts_dropped_with_count(data, caplog):
    run = run_config(f"env.data.path={data / 'mixed.jsonl'}", "env.data.eval_size=0", "env.dev_size=0")
    with caplog.at_level(logging.WARNING):
        env, _ = check_run(run)
    assert len(env.train_tasks()) == 8
    limit = 1024 - RolloutConfig().max_new_tokens
    assert f"dropped 3 of 11 tasks whose prompt is longer than {limit} tokens" in caplog.text


def test_long_prompts_truncated_on_request(data, caplog):
    run = run_config(f"env.data.path={data / 'mixed.jsonl'}", "env.data.eval_size=0", "env.dev_size=0",
                     "env.data.long_prompts=truncate", "rollout.max_new_tokens=24")
    with caplog.at_level(logging.WARNING):
        env, _ = check_run(run)
    tasks = env.train_tasks()
    assert len(tasks) == 11
    from marl_llm.models import resolve_model
    from marl_llm.rollout.worker import load_tokenizer, prompt_ids_of
    from marl_llm.types import GenerationRequest
    tok = load_tokenizer(resolve_model(run.model))
    lengths = [len(prompt_ids_of(tok, GenerationRequest(messages=env.prompt(t)))) for t in tasks]
    assert max(lengths) <= 1024 - 24 and max(lengths) > 900  # cut to fit, not emptied
    assert "cut the longest prompt field of 3 of 11 tasks" in caplog.text


def test_check_run_needs_training_tasks(tmp_path):
    run = run_config(f"env.data.path={write_jsonl(tmp_path / 'one.jsonl', [{'question': 'q', 'answer': '1'}])}",
                     "env.data.eval_size=0", "env.data.limit=0")
    with pytest.raises(PreflightError, match="no training tasks"):
        check_run(run)


# ---- every model preset takes model.path=... --------------------------------------------------------
PRESETS = sorted(p.stem for p in (ROOT / "conf" / "model").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS)
def test_every_preset_accepts_model_path_override(preset, tiny_model_path):
    run = run_config(f"model={preset}", "model.source=hf", f"model.path={tiny_model_path}")
    assert run.model.path == tiny_model_path
    import yaml
    from dataclasses import fields
    from marl_llm.config import ModelConfig
    keys = set(yaml.safe_load((ROOT / "conf" / "model" / f"{preset}.yaml").read_text()))
    assert keys == {f.name for f in fields(ModelConfig)}


# ---- a multi-turn context that outgrows the model is cut, logged, never sent too long ------------------
def test_growing_context_is_cut_to_fit(data, caplog):
    run = run_config(f"env.data.path={data / 'good.jsonl'}", "env.data.eval_size=0", "rollout.max_new_tokens=24")
    env, _ = check_run(run)
    from marl_llm.models import resolve_model
    from marl_llm.rollout.worker import load_tokenizer, prompt_ids_of
    from marl_llm.types import GenerationRequest
    tok = load_tokenizer(resolve_model(run.model))
    task = env.train_tasks()[0]
    short = env.prompt(task, "single", previous="I think 2.", feedback="Check again.")
    assert "I think 2." in short[-1]["content"] and "Check again." in short[-1]["content"]  # fits: untouched
    long_prev = "Let me reason step by step about this. " * 300  # ~2700 tokens
    with caplog.at_level(logging.WARNING):
        msgs = env.prompt(task, "single", previous=long_prev, feedback="Check again.")
    n = len(prompt_ids_of(tok, GenerationRequest(messages=msgs)))
    assert 900 < n <= 1024 - 24
    assert "Check again." in msgs[-1]["content"] and "[...]" in msgs[-1]["content"]
    assert "tokens too long for the model; its longest parts were cut" in caplog.text
    # a protocol's own prompt (MLPO's leader over three team answers): each long answer is cut
    env, algo = check_run(run_config(f"env.data.path={data / 'good.jsonl'}", "env.data.eval_size=0",
                                     "rollout.max_new_tokens=24", "algo=mlpo", "algo.team_view=solutions"))
    team = algo.leader_prompt(task, [long_prev, "The answer is 3.", long_prev])
    assert len(prompt_ids_of(tok, GenerationRequest(messages=team))) <= 1024 - 24
    assert "The answer is 3." in team[-1]["content"] and "Solution 3:" in team[-1]["content"]
    # with team_view=answers (the main job) a final answer as long as a reply is cut too
    env, algo = check_run(run_config(f"env.data.path={data / 'good.jsonl'}", "env.data.eval_size=0",
                                     "rollout.max_new_tokens=24", "algo=mlpo", "algo.team_view=answers"))
    team = algo.leader_prompt(task, [f"<answer>{long_prev}</answer>", "The answer is 3.", "no idea"])
    assert len(prompt_ids_of(tok, GenerationRequest(messages=team))) <= 1024 - 24
    assert "[...]" in team[-1]["content"] and "Agent 2: 3\nAgent 3: (no final answer)" in team[-1]["content"]


# ---- memory: an estimate against what Ray allows, a warning with the breakdown ---------------------
def memory_estimate(*overrides):
    from marl_llm.preflight import estimate_memory
    from marl_llm.registry import ALGORITHMS, ENVS
    run = run_config(*overrides)
    algo = ALGORITHMS.get(run.algo.name)(run.algo, ENVS.get(run.env.name)(run.env, seed=0), run)
    return run, algo.policy_specs(), estimate_memory(algo.policy_specs(), run)


def test_memory_estimate_follows_the_settings_that_lower_it():
    from marl_llm import preflight
    from marl_llm.models import resolve_model, weights_bytes
    run, _, base = memory_estimate("algo=malt")
    w = weights_bytes(resolve_model(run.model)) / 2**30
    assert {k for k in base if k.startswith("engine")} == {"engine generator", "engine verifier", "engine refiner"}
    assert base["learner verifier"] == pytest.approx(6 * w + preflight.LEARNER_OVERHEAD_GB)  # ZeRO-3, 1 rank: 5 copies + the DPO reference
    _, _, zero0 = memory_estimate("algo=malt", "learner.zero_stage=0")
    assert zero0["learner verifier"] == pytest.approx(base["learner verifier"] - w)
    _, _, kv = memory_estimate("algo=malt", "rollout.kv_cache_gb=0.5")
    assert kv["engine refiner"] == pytest.approx(base["engine refiner"] - 0.5)
    _, _, small = memory_estimate("algo=malt", "learner.micro_batch_tokens=512")
    assert small["training micro-batch"] == pytest.approx(base["training micro-batch"] / 4)
    # micro-batches in flight at once: one per rank; the three roles' groups together when concurrent
    _, _, ranks = memory_estimate("algo=malt", "learner.num_ranks=2")
    assert ranks["training micro-batch"] == pytest.approx(2 * base["training micro-batch"])
    _, _, together = memory_estimate("algo=malt", "learner.concurrent=true")
    assert together["training micro-batch"] == pytest.approx(3 * base["training micro-batch"])
    _, _, lora = memory_estimate("algo=malt", "+model.lora.r=16")  # one shared engine, frozen bases
    assert [k for k in lora if k.startswith("engine")] == ["engine generator"]
    assert lora["learner verifier"] < base["learner verifier"]
    run, specs, mlpo = memory_estimate("algo=mlpo")  # the frozen team: an engine, no learner
    assert "engine team0" in mlpo and "learner team0" not in mlpo
    from marl_llm.preflight import estimate_memory
    assert set(estimate_memory(specs, run, train=False)) == {"driver", "engine leader", "engine team0"}  # evaluate


def test_a_run_over_the_memory_limit_gets_a_warning_naming_the_parts(monkeypatch, caplog):
    from marl_llm import preflight, runtime
    run, specs, est = memory_estimate("algo=malt")
    monkeypatch.setattr(runtime, "has_gpu", lambda: False)
    monkeypatch.setattr(preflight, "machine_memory_gb", lambda: 1000.0)
    assert preflight.check_memory(specs, run) is None
    monkeypatch.setattr(preflight, "machine_memory_gb", lambda: sum(est.values()))  # 95% of it is usable
    with caplog.at_level(logging.WARNING):
        msg = preflight.check_memory(specs, run)
    assert msg and msg in caplog.text
    for needle in ("estimated peak memory", "engine refiner", "learner verifier", "rollout.kv_cache_gb",
                   "learner.micro_batch_tokens"):
        assert needle in msg
    monkeypatch.setattr(runtime, "has_gpu", lambda: True)  # tensors live on the GPUs
    assert preflight.check_memory(specs, run) is None


def test_checkpoints_that_do_not_fit_on_the_disk_stop_the_run_before_it_starts(monkeypatch, tmp_path):
    """The main job (one trained SmolLM2 leader, steps 14, save_every 10): two checkpoints at
    once of the HF weights + the DeepSpeed state (3 fp32 copies); short of it, one line naming the
    free space, the need and the settings that lower it; a resumed run's checkpoints count as written."""
    import shutil as sh

    from marl_llm import preflight
    from marl_llm.models import resolve_model, weights_bytes
    run, specs, _ = memory_estimate("algo=mlpo", "trainer.steps=14", "trainer.save_every=10")
    w = weights_bytes(resolve_model(run.model))
    each = preflight.checkpoint_bytes(specs)
    assert each == pytest.approx(4 * w)  # fp32 model: HF weights + fp32 weights and 2 Adam moments
    assert preflight.checkpoints_at_once(run) == 2  # steps 10 and 14
    usage = sh.disk_usage(tmp_path)
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=int(2 * each) + 1))
    preflight.check_disk(specs, run, tmp_path)  # fits
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=int(1.5 * each)))
    with pytest.raises(PreflightError) as e:
        preflight.check_disk(specs, run, tmp_path / "new" / "run")  # a folder not made yet: its parent's disk
    for needle in (f"{str(tmp_path / 'new' / 'run')!r} has", " free and the run's checkpoints need about", "2 at once",
                   "trainer.keep_checkpoints=1", "trainer.save_every=0"):
        assert needle in str(e.value), e.value
    (tmp_path / "checkpoints" / "step_10").mkdir(parents=True)  # resumed after step 10: one more to write
    (tmp_path / "checkpoints" / "step_10" / "trainer_state.json").write_text("{}")
    assert preflight.checkpoints_at_once(run, existing=1, start=10) == 2
    preflight.check_disk(specs, run, tmp_path)  # 1.5 checkpoints free, 1 needed
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=int(0.5 * each)))
    with pytest.raises(PreflightError, match="need about .* more .2 at once"):
        preflight.check_disk(specs, run, tmp_path)
    assert preflight.checkpoints_at_once(run, existing=3, start=10) == 4  # kept 2, pruned after the next save
    run.trainer.save_every = 0  # no checkpoints: nothing to fit
    monkeypatch.setattr(preflight.shutil, "disk_usage", lambda p: usage._replace(free=0))
    preflight.check_disk(specs, run, tmp_path / "x")


def test_a_save_that_fails_on_a_full_disk_says_so_and_leaves_no_half_checkpoint(monkeypatch, tmp_path):
    """The disk filled up after the start (another job): the save's own error (a torch writer's
    "enforce fail") becomes one line naming the free space, the size and how to continue."""
    from types import SimpleNamespace

    from marl_llm import trainer as trainer_mod

    run, specs, _ = memory_estimate("algo=mlpo", f"trainer.output_dir={tmp_path}")

    def full(path):
        Path(path).mkdir(parents=True)
        raise RuntimeError("[enforce fail at inline_container.cc:672] . unexpected pos 64 vs 0")

    learner = SimpleNamespace(save_hf=full, save_state=full)
    policies = {s.name: SimpleNamespace(spec=s, learner=learner if s.trainable else None) for s in specs}
    t = trainer_mod.Trainer(run)
    monkeypatch.setattr(trainer_mod, "disk_free", lambda folder: 2**10)
    with pytest.raises(OSError, match=r"checkpoint step_3 not written: 1.0 KiB free in .*, a checkpoint of this run "
                                      r"takes about [0-9.]+ MiB; free space and continue with trainer.resume=true") as e:
        t._save(3, policies, {}, None, None)
    assert "enforce fail" in str(e.value.__cause__)
    assert not list((tmp_path / "checkpoints").iterdir())  # the staging folder is gone
    monkeypatch.setattr(trainer_mod, "disk_free", lambda folder: 2**40)  # space enough: the error as it was
    with pytest.raises(RuntimeError, match="enforce fail"):
        t._save(3, policies, {}, None, None)
