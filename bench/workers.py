"""Functions benchmark children run (importable by name, as the spawn start method needs)."""
from __future__ import annotations

import time

from marl_llm import runtime

runtime.apply_defaults()


def _worker(backend: str, model: str, max_tokens: int):
    """A rollout worker for the bench model ("tiny" or the embedded SmolLM2) and its start seconds."""
    from marl_llm.config import ModelConfig, RolloutConfig
    from marl_llm.models import resolve_model
    from marl_llm.rollout.worker import RolloutWorker

    mcfg = ModelConfig(name=model, source="tiny" if model == "tiny" else "smollm2_gguf")
    path = resolve_model(mcfg)
    t0 = time.perf_counter()
    w = RolloutWorker(path, mcfg, RolloutConfig(backend=backend, max_new_tokens=max_tokens), 0, "bench")
    return w, time.perf_counter() - t0


def _requests(prompts, n: int, max_tokens: int, seed_each: bool = False):
    """One chat request per prompt, n samples at temperature 1 (seed 0, or the prompt's index)."""
    from marl_llm.types import GenerationRequest, SamplingConfig
    return [GenerationRequest(messages=[{"role": "user", "content": p}],
                              sampling=SamplingConfig(n=n, temperature=1.0, max_tokens=max_tokens,
                                                      seed=i if seed_each else 0))
            for i, p in enumerate(prompts)]


def _tokens(outs) -> int:
    return sum(len(c.completion_ids) for o in outs for c in o)


def rollout_worker(args):
    """Runs in a child process: one backend, warm-up, then timed generation."""
    backend, model, prompts, n, max_tokens = args
    w, start = _worker(backend, model, max_tokens)
    reqs = _requests(prompts, n, max_tokens)
    w.generate(reqs[:2])  # warm-up
    t0 = time.perf_counter()
    outs = w.generate(reqs)
    dt = time.perf_counter() - t0
    w.shutdown()
    return {"backend": backend, "start_s": start, "seconds": dt, "tokens": _tokens(outs)}


def concurrent_rollout_worker(args):
    """Runs in a child process next to another one: a vLLM rollout worker that waits at `barrier`
    for the other engine, then generates its share; returns when it started and ended."""
    model, prompts, n, max_tokens, rebalance_s, barrier = args
    import os

    os.environ[runtime.REBALANCE_ENV] = str(rebalance_s)
    w, _ = _worker("vllm", model, max_tokens)
    reqs = _requests(prompts, n, max_tokens, seed_each=True)
    w.generate(reqs[:1])  # warm-up
    barrier.wait()
    t0 = time.time()
    outs = w.generate(reqs)
    t1 = time.time()
    w.shutdown()
    return {"start": t0, "end": t1, "tokens": _tokens(outs)}


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


def _smoke_or_real(model: str):
    from marl_llm.config import ModelConfig
    from marl_llm.models import resolve_model
    mcfg = ModelConfig(name=model, source="tiny" if model == "tiny" else "smollm2_gguf")
    return mcfg, resolve_model(mcfg)


def _chat_ids(path: str, prompts: list[str]) -> list[list[int]]:
    from marl_llm.rollout.backend import load_tokenizer, prompt_ids_of
    from marl_llm.types import GenerationRequest
    tok = load_tokenizer(path)
    return [prompt_ids_of(tok, GenerationRequest(messages=[{"role": "user", "content": p}])) for p in prompts]


def raw_vllm_worker(args):
    """Runs in a child process: `vllm.LLM` built from the rollout worker's engine arguments, all
    cores, prompts as token ids; one warm-up call, then one timed call."""
    model, prompts, n, max_tokens = args
    import vllm
    from vllm import SamplingParams
    from vllm.inputs import TokensPrompt

    from marl_llm.config import RolloutConfig
    from marl_llm.rollout.vllm_backend import engine_args

    mcfg, path = _smoke_or_real(model)
    threads = runtime.cpu_cores()
    runtime.set_threads(threads)
    llm = vllm.LLM(**engine_args(path, mcfg, RolloutConfig(max_new_tokens=max_tokens), 0))
    ids = [TokensPrompt(prompt_token_ids=p) for p in _chat_ids(path, prompts)]
    params = [SamplingParams(n=n, temperature=1.0, top_p=1.0, top_k=0, max_tokens=max_tokens, seed=i, logprobs=0)
              for i in range(len(ids))]
    llm.generate(ids[:2], params[:2], use_tqdm=False)
    t0 = time.perf_counter()
    outs = llm.generate(ids, params, use_tqdm=False)
    dt = time.perf_counter() - t0
    tokens = sum(len(c.token_ids) for o in outs for c in o.outputs)
    llm.llm_engine.engine_core.shutdown()
    return {"name": "raw vllm.LLM (in-process)", "seconds": dt, "tokens": tokens, "threads": threads}


def rollout_actor_worker(args):
    """Runs in a child process: the rollout worker as training uses it, a Ray actor behind
    `Policy.generate` (its generate call takes the cores through runtime.compute_phase)."""
    model, prompts, n, max_tokens = args
    from hydra import compose, initialize_config_dir

    from marl_llm.cluster import Cluster
    from marl_llm.config import conf_dir, validate
    from marl_llm.models import resolve_model
    from marl_llm.policy import PolicySpec
    from marl_llm.types import GenerationRequest, SamplingConfig

    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        run = validate(compose(config_name="config", overrides=[
            "env=toy", f"model={model}", "rollout.backend=vllm", f"rollout.max_new_tokens={max_tokens}"]))
    cluster = Cluster(run.cluster).start()
    try:
        policy = cluster.build_policies([PolicySpec("bench", run.model, trainable=False)], run)["bench"]
        reqs = [GenerationRequest(prompt_ids=p, sampling=SamplingConfig(n=n, temperature=1.0, top_p=1.0,
                                                                        max_tokens=max_tokens, seed=i))
                for i, p in enumerate(_chat_ids(resolve_model(run.model), prompts))]
        policy.generate(reqs[:2])
        t0 = time.perf_counter()
        outs = policy.generate(reqs)
        dt = time.perf_counter() - t0
        tokens = sum(len(c.completion_ids) for o in outs for c in o)
    finally:
        cluster.shutdown()
    return {"name": "marl_llm rollout worker (Ray actor)", "seconds": dt, "tokens": tokens,
            "threads": runtime.cpu_cores()}


def _learner_samples(vocab: int, seed: int = 0):
    import random

    from marl_llm.types import Sample
    rng = random.Random(seed)
    samples = []
    for _ in range(4):  # 4 prompts x G=4, the vs_trl step's shape
        prompt = [rng.randrange(100, vocab - 1) for _ in range(88)]
        for _ in range(4):
            samples.append(Sample(prompt, [rng.randrange(100, vocab - 1) for _ in range(64)],
                                  advantage=rng.uniform(-1, 1)))
    return samples


def model_flops(hf_config, samples, n_linear: int) -> tuple[float, int]:
    """Training FLOPs of the work the objective needs (forward + backward = 3 x forward): every
    distinct prompt once and every completion token through the linear layers (2 x params per
    token), causal attention (4 x hidden x context per token and layer), and the logits of the
    completion tokens (2 x hidden x vocab). Padding and repeated prompts are not useful work."""
    from marl_llm.learner.worker import forward_tokens, prompt_groups
    d, layers, vocab = hf_config.hidden_size, hf_config.num_hidden_layers, hf_config.vocab_size
    distinct, _ = prompt_groups([s.prompt_ids for s in samples])
    tokens = forward_tokens(samples)
    attn = sum(sum(range(len(p))) for p in distinct)
    attn += sum(sum(range(len(s.prompt_ids), len(s.prompt_ids) + len(s.completion_ids))) for s in samples)
    logits = sum(len(s.completion_ids) for s in samples)
    fwd = 2 * n_linear * tokens + 4 * d * layers * attn + 2 * d * vocab * logits
    return 3.0 * fwd, tokens


def learner_worker(args):
    """Runs in a child process: one learner rank in-process (world size 1), a fixed GRPO-shaped
    batch; one warm-up step, then the fastest of `reps` timed train steps."""
    model, stage, share, threads, reps, mbs = args
    import torch

    from marl_llm.config import LearnerConfig
    from marl_llm.learner.worker import LearnerWorker
    from marl_llm.losses import LossConfig
    from marl_llm.weight_sync import free_port

    mcfg, path = _smoke_or_real(model)
    lc = LearnerConfig(zero_stage=stage, share_prompts=share, threads=threads, micro_batch_size=mbs)
    w = LearnerWorker(0, 1, "127.0.0.1", free_port(), path, mcfg, lc, 0, False, "bench")
    samples = _learner_samples(w.hf_config.vocab_size)
    loss = LossConfig(kind="pg", clip_eps=0.2, norm_tokens=64)
    n_tok = sum(len(s.completion_ids) for s in samples)
    times = []
    for _ in range(reps + 1):
        t0 = time.perf_counter()
        w.train_step(samples, loss, len(samples), n_tok, 0)
        times.append(time.perf_counter() - t0)
    n_linear = sum(getattr(m.weight, "ds_numel", m.weight.numel()) for name, m in w.engine.module.named_modules()
                   if isinstance(m, torch.nn.Linear) and "lm_head" not in name)
    flops, tokens = model_flops(w.hf_config, samples, n_linear)
    w.shutdown()
    return {"seconds": min(times[1:]), "flops": flops, "tokens": tokens,
            "dtype": "bfloat16" if w.bf16 else "float32", "hidden": w.hf_config.hidden_size,
            "intermediate": getattr(w.hf_config, "intermediate_size", 4 * w.hf_config.hidden_size)}


def gemm_ceiling(args):
    """Runs in a child process: FLOP/s of a torch matmul of the model's MLP shape (1024 tokens)
    at the given dtype and thread count, best of several repetitions."""
    dtype, threads, hidden, intermediate = args
    import torch
    runtime.set_threads(threads)
    dt = getattr(torch, dtype)
    a, b = torch.randn(1024, hidden, dtype=dt), torch.randn(hidden, intermediate, dtype=dt)
    for _ in range(3):
        a @ b
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        best = min(best, (time.perf_counter() - t0) / 10)
    return 2.0 * 1024 * hidden * intermediate / best
