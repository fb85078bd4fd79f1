"""The GPU plan (marl_llm.gpu_plan) before any GPU: actors placed as the cluster code asks Ray for
them, each learner rank's model states exactly DeepSpeed's estimate for the presets' model sizes,
too small a cluster or GPU stopped with one line, `python -m marl_llm preflight` printing the plan
without starting Ray, CPU runs untouched. Nothing here loads a model or starts an engine."""
import logging
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from marl_llm import gpu_plan
from marl_llm.api import compose
from marl_llm.config import ClusterConfig
from marl_llm.gpu_plan import GB, GpuCluster, KNOWN_MODELS, Shape, model_shape, plan_run, target_cluster
from marl_llm.preflight import PreflightError, check_gpus, policy_specs

ROOT = Path(__file__).resolve().parents[2]
NODE_8X80 = GpuCluster(1, 8, 80.0, "test")
# preset -> (parameters of its model in billions, from the model cards; GPUs in docs/GPU.md's table)
PRESETS = {"mlpo_paper": (7.62, 8), "magrpo_writing_paper": (1.72, 5), "magrpo_coding_paper": (3.09, 5),
           "malt_paper": (8.03, 4)}


def plan(*overrides, cluster=NODE_8X80):
    run = compose(*overrides)
    return plan_run(policy_specs(run), run, cluster), run


def learners(p):
    return [a for d in p.devices for a in d.actors if a.role == "learner"]


def model_states(actor) -> float:
    return next(v for k, v in actor.parts.items() if k.startswith("model states"))


def deepspeed_table(capsys, stage: int, params: int, largest: int, ranks: int) -> dict[str, float]:
    """What DeepSpeed's `estimate_zero{2,3}_model_states_mem_needs_all_cold` prints: options -> GiB per GPU."""
    if stage == 3:
        from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs_all_cold as cold
        cold(params, largest, num_gpus_per_node=ranks)
    else:
        from deepspeed.runtime.zero.stage_1_and_2 import estimate_zero2_model_states_mem_needs_all_cold as cold
        cold(params, num_gpus_per_node=ranks)
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines() if line.count("|") == 2]
    # the options column prints the offload device as `cpu ` or `OffloadDeviceEnum.cpu`, by Python version
    return {" ".join(opts.replace("OffloadDeviceEnum.", "").split()).replace(" ,", ","):
            float(gpu.strip().removesuffix("GB")) for _, gpu, opts in rows[1:]}


@pytest.mark.parametrize("preset", list(PRESETS))
def test_presets_model_states_are_deepspeeds_estimate(preset, capsys):
    from deepspeed.runtime.zero.stage3 import estimate_zero3_model_states_mem_needs

    p, run = plan(f"experiment={preset}")
    billions, gpus = PRESETS[preset]
    assert len(p.devices) == gpus
    assert model_shape(run.model).params / 1e9 == pytest.approx(billions, abs=0.005)
    specs = {s.name: s for s in policy_specs(run)}
    for a in learners(p):
        s = specs[a.name.split()[1]]
        shape, n = model_shape(s.model), run.learner.num_ranks
        trained = shape.lora_params(s.model.lora) if s.model.lora else shape.params
        _, gpu_bytes, _ = estimate_zero3_model_states_mem_needs(trained, shape.largest_layer, num_gpus_per_node=n,
                                                                cpu_offload=False, cpu_offload_params=False)
        assert model_states(a) == gpu_bytes / GB
        printed = deepspeed_table(capsys, 3, trained, shape.largest_layer, n)
        assert printed["offload_param=none, offload_optimizer=none, zero_init=1"] == round(model_states(a), 2)


@pytest.mark.parametrize("stage, offload, row", [
    (3, True, "offload_param=none, offload_optimizer=cpu, zero_init=1"),
    (2, False, "offload_optimizer=none"),
    (2, True, "offload_optimizer=cpu"),
])
def test_zero_stage_and_offload_follow_deepspeeds_table(stage, offload, row, capsys):
    p, _ = plan("experiment=mlpo_paper", f"learner.zero_stage={stage}", f"learner.offload_optimizer={offload}")
    shape = KNOWN_MODELS["Qwen/Qwen2.5-7B-Instruct"]
    printed = deepspeed_table(capsys, stage, shape.params, shape.largest_layer, 4)
    assert {round(model_states(a), 2) for a in learners(p)} == {printed[row]}


@pytest.mark.parametrize("hub_id", ["Qwen/Qwen2.5-7B-Instruct", "Qwen/Qwen3-1.7B", "meta-llama/Llama-3.1-8B-Instruct"])
def test_parameter_count_is_what_transformers_builds(hub_id):
    """The shape formula against the model transformers builds from the same numbers (on the meta
    device: no memory); Qwen's q/k/v biases and q/k norms are the only parameters it leaves out."""
    import torch
    from transformers import LlamaConfig, Qwen2Config, Qwen3Config

    s: Shape = KNOWN_MODELS[hub_id]
    kind = {"Qwen/Qwen2.5": Qwen2Config, "Qwen/Qwen3": Qwen3Config, "meta-llama": LlamaConfig}
    config_cls = next(c for prefix, c in kind.items() if hub_id.startswith(prefix))
    config = config_cls(hidden_size=s.hidden, num_hidden_layers=s.layers, intermediate_size=s.intermediate,
                        num_attention_heads=s.heads, num_key_value_heads=s.kv_heads, vocab_size=s.vocab,
                        tie_word_embeddings=s.tied, **({"head_dim": s.head_dim} if s.head_dim else {}))
    from transformers import AutoModelForCausalLM
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert s.params == pytest.approx(sum(p.numel() for p in model.parameters()), rel=1e-4)
    assert s.largest_layer == max(sum(p.numel() for p in m.parameters(recurse=False)) for m in model.modules())


def test_split_layout_packs_nodes_in_creation_order():
    p, _ = plan("experiment=mlpo_paper", cluster=GpuCluster(2, 4, 80.0, "test"))
    layout = {d.name: [a.name for a in d.actors] for d in p.devices}
    assert layout == {
        "node0:gpu0": ["rollout leader #0"], "node0:gpu1": ["rollout leader #1"],
        "node0:gpu2": ["learner leader rank 0"], "node0:gpu3": ["learner leader rank 1"],
        "node1:gpu0": ["learner leader rank 2"], "node1:gpu1": ["learner leader rank 3"],
        "node1:gpu2": ["rollout team0+team1+team2+untrained_leader #0"],
        "node1:gpu3": ["rollout team0+team1+team2+untrained_leader #1"]}


def test_tensor_parallel_engine_takes_whole_devices_of_one_node():
    p, _ = plan("experiment=magrpo_writing_paper", "rollout.tensor_parallel_size=2")
    engine = [d.name for d in p.devices if any(a.name == "rollout agent1 #0" for a in d.actors)]
    assert engine == ["node0:gpu0", "node0:gpu1"] and len(p.devices) == 8
    with pytest.raises(PreflightError, match="asks for 4 GPUs .* a node has 2"):
        plan("experiment=magrpo_writing_paper", "rollout.tensor_parallel_size=4", cluster=GpuCluster(4, 2, 80.0, "t"))


def test_colocated_fractions_share_a_device():
    one_gpu = ["algo=grpo", "env=math", "model=qwen2.5-1.5b-instruct", "algo.eval_baselines=[]",
               "rollout.num_gpus=0.5", "learner.num_gpus=0.5", "rollout.gpu_memory_utilization=0.3"]
    p, _ = plan(*one_gpu)
    (device,) = p.devices
    assert [a.name for a in device.actors] == ["rollout policy #0", "learner policy rank 0"]
    assert device.gb == pytest.approx(sum(a.gb for a in device.actors)) and device.actors[0].gb == 0.3 * 80
    p, _ = plan(*one_gpu, "learner.num_ranks=2")  # a third half-GPU request opens a second device
    assert [[a.name for a in d.actors] for d in p.devices] == [
        ["rollout policy #0", "learner policy rank 0"], ["learner policy rank 1"]]


def test_too_small_cluster_is_one_line():
    with pytest.raises(PreflightError) as e:
        plan("experiment=mlpo_paper", cluster=GpuCluster(1, 4, 80.0, "test"))
    msg = str(e.value)
    assert "\n" not in msg and "needs 8 GPUs" in msg and "the cluster has 4" in msg and "learner.num_ranks" in msg


def test_too_small_gpu_names_device_actors_estimate_limit_and_knobs():
    p, _ = plan("experiment=mlpo_paper", cluster=GpuCluster(1, 8, 40.0, "test"))
    with pytest.raises(PreflightError) as e:
        p.check()
    msg = str(e.value)
    rank = learners(p)[0]
    assert "\n" not in msg and msg.startswith(f"GPU node0:gpu2 needs an estimated {rank.gb:.1f} GiB, over its 40 GiB")
    for needle in ("learner leader rank 0", "model states", "learner.num_ranks", "learner.zero_stage",
                   "learner.offload_optimizer", "learner.gradient_checkpointing", "learner.micro_batch_size"):
        assert needle in msg
    p, _ = plan("experiment=mlpo_paper", cluster=GpuCluster(1, 8, 20.0, "test"))  # 12 GiB share < 14.2 GiB weights
    with pytest.raises(PreflightError, match=r"^GPU node0:gpu0: rollout leader #0 gets 12.0 GiB .* raise "
                                             r"rollout.gpu_memory_utilization"):
        p.check()


def test_check_run_hook_uses_the_described_cluster(monkeypatch, caplog):
    monkeypatch.setattr(gpu_plan, "detect_gpus", lambda: None)
    run = compose("experiment=mlpo_paper", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=40")
    with pytest.raises(PreflightError, match="GPU node0:gpu2 needs an estimated"):
        check_gpus(policy_specs(run), run)
    run = compose("experiment=mlpo_paper", "cluster.gpus_per_node=8", "cluster.gpu_memory_gb=80")
    with caplog.at_level(logging.INFO, logger="marl_llm.preflight"):
        assert len(check_gpus(policy_specs(run), run).devices) == 8
    assert "node0:gpu7" in caplog.text


def test_cpu_only_run_skips_the_gpu_plan(monkeypatch, caplog):
    monkeypatch.setattr(gpu_plan, "detect_gpus", lambda: None)
    run = compose("experiment=smoke")
    with caplog.at_level(logging.INFO, logger="marl_llm.preflight"):
        assert check_gpus(policy_specs(run), run) is None
    assert "GPU plan skipped" in caplog.text
    assert target_cluster(ClusterConfig()) is None
    assert target_cluster(ClusterConfig(), default=True).gpus == 8  # the preflight command's default description
    monkeypatch.setattr(gpu_plan, "detect_gpus", lambda: (2, 23.6))  # a GPU machine: its GPUs are the target
    detected = target_cluster(ClusterConfig())
    assert (detected.gpus, detected.memory_gb) == (2, 23.6) and detected.origin.startswith("detected")


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_cli_prints_the_plan_and_starts_nothing():
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", "RAY_AUTH_MODE": "disabled"}
    # the CLI's own code, then whether it imported Ray at all (nothing can start without it)
    probe = ("import sys; from marl_llm.__main__ import main; rc = main(sys.argv[1:]); "
             "print('ray imported:', 'ray' in sys.modules); sys.exit(rc)")
    t0 = time.time()
    r = subprocess.run([sys.executable, "-c", probe, "preflight", "experiment=mlpo_paper"], capture_output=True,
                       text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-2000:]
    assert r.stdout.startswith("GPU plan: 1 node x 8 GPUs x 80 GiB (the default description")
    assert "node0:gpu7" in r.stdout and "learner leader rank 3: model states" in r.stdout
    assert "ray imported: False" in r.stdout and time.time() - t0 < 60
    r = subprocess.run([sys.executable, "-m", "marl_llm.preflight", "experiment=mlpo_paper", "cluster.gpus_per_node=8",
                        "cluster.gpu_memory_gb=40"], capture_output=True, text=True, timeout=60, cwd=ROOT, env=env)
    assert r.returncode == 2 and "node0:gpu2" in r.stdout  # the plan, then why it does not fit
    (line,) = r.stderr.strip().splitlines()
    assert line.startswith("error: GPU node0:gpu2 needs an estimated") and "over its 40 GiB" in line


def test_cli_help_describes_the_command_and_keys(capsys):
    from marl_llm.preflight import main

    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("`python -m marl_llm.preflight") and "cluster.gpu_memory_gb = 0.0" in out
    assert "memory of one GPU in GiB" in out
