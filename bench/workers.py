"""Functions benchmark children run (importable by name, as the spawn start method needs)."""
from __future__ import annotations

import time

from marl_llm import runtime

runtime.apply_defaults()


def rollout_worker(args):
    """Runs in a child process: one backend, warm-up, then timed generation."""
    backend, model, prompts, n, max_tokens = args
    from marl_llm.config import ModelConfig, RolloutConfig
    from marl_llm.models import resolve_model
    from marl_llm.rollout.worker import RolloutWorker
    from marl_llm.types import GenerationRequest, SamplingConfig

    mcfg = ModelConfig(name=model, source="tiny" if model == "tiny" else "smollm2_gguf")
    path = resolve_model(mcfg)
    t0 = time.perf_counter()
    w = RolloutWorker(path, mcfg, RolloutConfig(backend=backend, max_new_tokens=max_tokens), 0, "bench")
    start = time.perf_counter() - t0
    sampling = SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens, seed=0)
    reqs = [GenerationRequest(messages=[{"role": "user", "content": p}], sampling=sampling) for p in prompts]
    w.generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    outs = w.generate(reqs)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.completion_ids) for o in outs for c in o)
    w.shutdown()
    return {"backend": backend, "start_s": start, "seconds": dt, "tokens": tokens}


def lora_sync_worker(args):
    """Runs in a child process: one policy with full weights, then one LoRA policy on a shared
    engine; per policy a few SFT steps, each followed by a timed weight sync, then timed generation."""
    model, reps, prompts, max_tokens = args
    import dataclasses

    import ray
    from hydra import compose, initialize_config_dir

    from marl_llm.cluster import Cluster
    from marl_llm.config import LoraConfig, conf_dir, validate
    from marl_llm.losses import LossConfig
    from marl_llm.policy import PolicySpec
    from marl_llm.types import GenerationRequest, Sample, SamplingConfig

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        run = validate(compose(config_name="config", overrides=["env=toy", f"model={model}", "rollout.backend=vllm",
                                                                "learner.lr=1e-5"]))
    cluster = Cluster(run.cluster).start()
    reqs = [GenerationRequest(messages=[{"role": "user", "content": p}],
                              sampling=SamplingConfig(n=1, temperature=1.0, max_tokens=max_tokens, seed=0))
            for p in prompts]
    out = []
    try:
        for kind, mcfg in (("full", run.model), ("lora", dataclasses.replace(run.model, lora=LoraConfig()))):
            policy = cluster.build_policies([PolicySpec(kind, mcfg)], run)[kind]
            samples = [Sample(c.prompt_ids, c.completion_ids) for o in policy.generate(reqs[:4]) for c in o]
            syncs = []
            for _ in range(reps):
                policy.train(samples, LossConfig(kind="sft"))
                t0 = time.perf_counter()
                info = policy.sync_weights()
                syncs.append((time.perf_counter() - t0, info.get("bytes", 0)))
            t0 = time.perf_counter()
            tokens = sum(len(c.completion_ids) for o in policy.generate(reqs) for c in o)
            gen_s = time.perf_counter() - t0
            out.append({"kind": kind, "sync_s": sum(s for s, _ in syncs[1:]) / max(1, reps - 1),
                        "bytes": syncs[-1][1], "tokens": tokens, "gen_s": gen_s})
            policy.learner.shutdown()
            for w in policy.rollout_workers:
                ray.kill(w)
    finally:
        cluster.shutdown()
    return out
