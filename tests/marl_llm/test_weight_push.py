"""After a learner step and a weight push, the vLLM rollout engine samples from the learner's weights.

Real engines: a Ray actor running vLLM and a 2-rank DeepSpeed ZeRO-3 learner group, built through
the same Cluster/Policy path the trainer uses.
"""
import pytest
import torch
from hydra import compose, initialize_config_dir

from marl_llm.config import conf_dir, validate
from marl_llm.losses import LossConfig
from marl_llm.policy import PolicySpec
from marl_llm.types import GenerationRequest, Sample, SamplingConfig

PROMPTS = ["Name a colour.", "Count to three.", "Say hello."]


# eager (the tiny model's default) and compiled (real models' default: torch.compile must read
# the reloaded weights, not constants folded at compile time)
@pytest.fixture(scope="module", params=["true", "false"], ids=["eager", "compiled"])
def policy(ray_session, request):
    from marl_llm.cluster import Cluster

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[
            "env=toy", "model=tiny", "learner.num_ranks=2", "rollout.backend=vllm", "learner.lr=0.01",
            f"rollout.enforce_eager={request.param}"])
    run = validate(cfg)
    p = Cluster(run.cluster).start().build_policy(PolicySpec("policy", run.model), run)
    yield p
    p.learner.shutdown()


def greedy(policy):
    reqs = [GenerationRequest(messages=[{"role": "user", "content": q}],
                              sampling=SamplingConfig(n=1, temperature=0.0, max_tokens=8)) for q in PROMPTS]
    return [o[0] for o in policy.generate(reqs)]


def test_rollout_matches_learner_after_push(policy):
    before = greedy(policy)
    # before any update both engines hold the same weights
    lp0 = policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in before])
    for c, lp in zip(before, lp0):
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(lp), atol=2e-3)

    target = next(t for t in range(1000, 2000) if all(t not in c.completion_ids for c in before))
    ids = [target] * 6  # a completion the model does not produce yet, to pull the weights towards
    sft = [Sample(c.prompt_ids, ids) for c in before]
    for _ in range(3):
        policy.train(sft, LossConfig(kind="sft"))
    assert policy.dirty
    policy.sync_weights()
    after = greedy(policy)
    assert all(target in c.completion_ids for c in after), \
        f"rollout output did not follow the trained weights: {[c.completion_ids for c in after]}"
    lp = policy.logprobs([Sample(c.prompt_ids, c.completion_ids) for c in after])
    for c, l in zip(after, lp):
        assert torch.allclose(torch.tensor(c.logprobs), torch.tensor(l), atol=2e-3), (c.logprobs, l)
