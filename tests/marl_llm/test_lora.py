"""LoRA policies: a peft adapter trained on a frozen base by the ZeRO-3 learner (2 ranks); two
LoRA policies served by ONE vLLM engine, each request through its policy's adapter; a sync pushes
only the adapter; the saved folder holds the merged model and the adapter, which reproduces the
trained model on the untouched base."""
import os

import pytest
import torch
from hydra import compose, initialize_config_dir

from marl_llm.config import ConfigError, LoraConfig, conf_dir, validate
from marl_llm.learner import lora
from marl_llm.losses import LossConfig
from marl_llm.policy import PolicySpec
from marl_llm.types import GenerationRequest, Sample, SamplingConfig

PROMPTS = ["Name a colour.", "Count to three.", "Say hello."]


def test_names_and_bad_target_modules(tiny_model_path):
    from transformers import AutoModelForCausalLM

    assert lora.hf_name("base_model.model.model.layers.0.self_attn.q_proj.base_layer.weight") == \
        "model.layers.0.self_attn.q_proj.weight"
    assert lora.hf_name("model.norm.weight") == "model.norm.weight"
    assert lora.adapter_key("base_model.model.model.layers.0.mlp.up_proj.lora_A.default.weight") == \
        "base_model.model.model.layers.0.mlp.up_proj.lora_A.weight"
    model = AutoModelForCausalLM.from_pretrained(tiny_model_path)
    with pytest.raises(ConfigError, match=r"target_modules has \['query'\].*q_proj"):
        lora.wrap(model, LoraConfig(target_modules=["q_proj", "query"]))
    wrapped = lora.wrap(model, LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    trainable = [n for n, p in wrapped.named_parameters() if p.requires_grad]
    assert trainable and all(lora.is_adapter_param(n) for n in trainable)


def test_lora_from_the_command_line_config():
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=["model=tiny", "+model.lora.r=4"])
    run = validate(cfg)
    assert run.model.lora == LoraConfig(r=4)


@pytest.fixture(scope="module")
def policies(ray_session):
    from marl_llm.cluster import Cluster

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "env=toy", "model=tiny", "+model.lora.r=8", "+model.lora.alpha=16", "learner.num_ranks=2",
            "rollout.backend=vllm", "learner.lr=0.01"])
    run = validate(cfg)
    specs = [PolicySpec("policy", run.model, reference=True), PolicySpec("other", run.model)]
    ps = Cluster(run.cluster).start().build_policies(specs, run)
    yield ps
    for p in ps.values():
        p.learner.shutdown()


@pytest.fixture(scope="module")
def policy(policies):
    return policies["policy"]


def greedy(policy):
    reqs = [GenerationRequest(messages=[{"role": "user", "content": q}],
                              sampling=SamplingConfig(n=1, temperature=0.0, max_tokens=8)) for q in PROMPTS]
    return [o[0] for o in policy.generate(reqs)]


def close(completions, logprobs, atol=2e-3):
    return all(torch.allclose(torch.tensor(c.logprobs), torch.tensor(lp), atol=atol)
               for c, lp in zip(completions, logprobs))


def hf_logprobs(model, samples):
    out = []
    for s in samples:
        with torch.no_grad():
            lp = model(torch.tensor([s.prompt_ids + s.completion_ids])).logits[0].float().log_softmax(-1)
        p = len(s.prompt_ids)
        out.append([lp[p - 1 + i, c].item() for i, c in enumerate(s.completion_ids)])
    return out


def test_lora_trains_adapter_only_and_rollout_follows(policies, policy, tmp_path, tiny_model_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    other = policies["other"]
    assert policy.rollout_workers == other.rollout_workers  # one engine for both adapters
    assert (policy.adapter, other.adapter) == ("policy", "other")
    info = policy.learner.info[0]
    assert info["lora"] and 0 < info["trainable_params"] < info["params"] / 10, info
    before = greedy(policy)
    assert [c.completion_ids for c in greedy(other)] == [c.completion_ids for c in before]
    # a fresh adapter (B = 0) is the base model: learner and engine agree
    assert close(before, policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in before]))

    target = next(t for t in range(1000, 2000) if all(t not in c.completion_ids for c in before))
    sft = [Sample(c.prompt_ids, [target] * 6) for c in before]
    losses = [policy.train(sft, LossConfig(kind="sft"))["loss"] for _ in range(4)]
    assert losses[-1] < losses[0] - 0.1, losses
    policy.sync_weights()
    after = greedy(policy)
    assert all(target in c.completion_ids for c in after), [c.completion_ids for c in after]
    trained = policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in after])
    assert close(after, trained)
    # the other adapter on the same engine still computes the base model
    assert [c.completion_ids for c in greedy(other)] == [c.completion_ids for c in before]
    # a second sync replaces the adapter (a new id, so vLLM does not serve a cached copy)
    policy.train(sft, LossConfig(kind="sft"))
    policy.sync_weights()
    again = greedy(policy)
    assert close(again, policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in again]))
    after, trained = again, policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in again])

    # the saved folder is the merged model; its adapter on the ORIGINAL base reproduces it, so the
    # base stayed frozen and only the adapter moved
    out = policy.learner.save_hf(str(tmp_path / "hf"))
    samples = [Sample(c.prompt_ids, c.completion_ids) for c in after]
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max(abs(a - b) for x, y in zip(hf_logprobs(merged, samples), trained) for a, b in zip(x, y)) < 1e-4
    assert os.path.isfile(os.path.join(out, lora.ADAPTER_DIR, "adapter_config.json"))
    base = AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32)
    adapted = PeftModel.from_pretrained(base, os.path.join(out, lora.ADAPTER_DIR)).eval()
    assert max(abs(a - b) for x, y in zip(hf_logprobs(adapted, samples), trained) for a, b in zip(x, y)) < 1e-4

    # the reference is the initial (base) model until a snapshot makes it the current one
    ref0 = policy.logprobs(samples, reference=True)
    assert max(abs(a - b) for x, y in zip(ref0, trained) for a, b in zip(x, y)) > 0.1
    policy.snapshot_reference()
    ref1 = policy.logprobs(samples, reference=True)
    assert max(abs(a - b) for x, y in zip(ref1, trained) for a, b in zip(x, y)) < 1e-5
