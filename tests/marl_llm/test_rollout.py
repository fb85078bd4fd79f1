"""Rollout workers on CPU with tiny random Llamas: both backends, in-process and as Ray actors.

The tiny models use head_dim 32 (hidden 64, 2 heads): vLLM's CPU attention supports head sizes
{32, 64, 80, ...} only, and initializer_range 0.3 so greedy choices have clear margins.
References are computed independently with a plain transformers forward pass in float32.
"""
from __future__ import annotations

import os

for _k, _v in {"HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "RAY_AUTH_MODE": "disabled"}.items():
    os.environ.setdefault(_k, _v)

from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()

import math  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

from marl_llm.config import ModelConfig, RolloutConfig  # noqa: E402
from marl_llm.models import resolve_model  # noqa: E402
from marl_llm.rollout.backend import read_safetensors_dir  # noqa: E402
from marl_llm.rollout.worker import RolloutWorker  # noqa: E402
from marl_llm.types import GenerationRequest, SamplingConfig  # noqa: E402

torch.set_num_threads(1)
pytestmark = pytest.mark.engine

TINY = dict(num_attention_heads=2, num_key_value_heads=1, initializer_range=0.3)
BASE = ModelConfig(name="tiny32", source="tiny", tiny=TINY, seed=0)
OTHER = ModelConfig(name="tiny32-b", source="tiny", tiny=TINY, seed=1)
BACKENDS = ["vllm", "hf"]
MESSAGES = [[{"role": "user", "content": "What is 2 + 3?"}],
            [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Name a colour."}]]


# ---- fixtures ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def paths():
    return {"base": resolve_model(BASE), "other": resolve_model(OTHER)}


@pytest.fixture(scope="module")
def tokenizer(paths):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(paths["base"])


@pytest.fixture(scope="module")
def vllm_worker(paths):
    w = RolloutWorker(paths["base"], BASE, RolloutConfig(backend="vllm", kv_cache_gb=1), seed=0,
                      policy_name="p")
    yield w
    w.shutdown()


@pytest.fixture(scope="module")
def hf_worker(paths):
    # a small batch size so that one call spans several left-padded batches
    w = RolloutWorker(paths["base"], BASE, RolloutConfig(backend="hf", hf_batch_size=4), seed=0,
                      policy_name="p")
    yield w
    w.shutdown()


@pytest.fixture(params=BACKENDS)
def worker(request):
    return request.getfixturevalue(f"{request.param}_worker")


_REFS: dict = {}


def ref_model(path):
    from transformers import AutoModelForCausalLM
    if path not in _REFS:
        _REFS[path] = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    return _REFS[path]


# ---- independent references ------------------------------------------------------------------
@torch.no_grad()
def ref_logits(model, prompt, completion):
    """Logits predicting each completion token, one full forward pass, float32."""
    ids = torch.tensor([list(prompt) + list(completion)])
    logits = model(ids).logits[0].float()
    return logits[len(prompt) - 1: len(prompt) - 1 + len(completion)]


def processed_logprobs(logits, tokens, temperature=0.0, top_p=1.0):
    """log-prob of each token under the distribution it was sampled from (temperature, top-p)."""
    if temperature > 0:
        logits = logits / temperature
        if top_p < 1.0:
            probs = logits.softmax(-1)
            sorted_p, order = probs.sort(-1, descending=False)
            drop_sorted = sorted_p.cumsum(-1) <= 1 - top_p
            drop_sorted[..., -1] = False
            drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
    lp = logits.log_softmax(-1)
    return lp.gather(1, torch.tensor(tokens).view(-1, 1)).squeeze(1)


@torch.no_grad()
def ref_greedy(model, prompt, max_tokens):
    ids = list(prompt)
    for _ in range(max_tokens):
        ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt):]


def template(tokenizer, messages):
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def eos_weights(path, eos):
    """A state dict whose greedy choice is always EOS.

    o_proj/down_proj = 0 makes the final hidden state the input token's embedding; every
    embedding row is close to one direction v and EOS's row is 3v, so with tied embeddings EOS
    wins the logits whatever the input. Also names the tied lm_head, as a learner's state_dict()
    does.
    """
    sd = dict(read_safetensors_dir(path))
    for k, t in sd.items():
        if k.endswith(("o_proj.weight", "down_proj.weight")):
            sd[k] = torch.zeros_like(t)
    emb = sd["model.embed_tokens.weight"]
    v = torch.randn(emb.shape[1], generator=torch.Generator().manual_seed(0))
    emb = 0.01 * emb + v
    emb[eos] = 3 * v
    sd["model.embed_tokens.weight"] = sd["lm_head.weight"] = emb
    return list(sd.items())


def long_prompt(n=300, seed=0):
    """Longer than two KV blocks (128 tokens on CPU), so the prefix cache really holds it."""
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, 40000, (n,), generator=g).tolist()


# ---- generation ------------------------------------------------------------------------------
def test_n_samples_shapes_and_template(worker, tokenizer):
    reqs = [GenerationRequest(messages=m, sampling=SamplingConfig(n=3, temperature=1.0, max_tokens=8))
            for m in MESSAGES]
    reqs.append(GenerationRequest(prompt_ids=[1, 520, 9531, 198],
                                  sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=5)))
    out = worker.generate(reqs)
    assert [len(c) for c in out] == [3, 3, 2]
    for req, comps in zip(reqs, out):
        want_prompt = template(tokenizer, req.messages) if req.messages else req.prompt_ids
        for c in comps:
            assert c.prompt_ids == want_prompt
            assert 1 <= len(c.completion_ids) <= req.sampling.max_tokens
            assert len(c.logprobs) == len(c.completion_ids)
            assert all(isinstance(x, float) and x <= 1e-6 and math.isfinite(x) for x in c.logprobs)
            assert c.text == tokenizer.decode(c.completion_ids, skip_special_tokens=True)
            assert c.finish_reason in ("stop", "length")
    # the chat template was applied (generation prompt included)
    p = out[0][0].prompt_ids
    assert tokenizer.decode(p).endswith("<|im_start|>assistant\n")
    assert "What is 2 + 3?" in tokenizer.decode(p)
    # n samples are distinct draws, not copies
    assert len({tuple(c.completion_ids) for c in out[0]}) > 1


def test_greedy_deterministic_and_logprobs_match_hf_forward(worker, paths, tokenizer):
    model = ref_model(paths["base"])
    reqs = [GenerationRequest(messages=m, sampling=SamplingConfig(n=2, temperature=0.0, max_tokens=12))
            for m in MESSAGES]
    first, second = worker.generate(reqs), worker.generate(reqs)
    for comps, again in zip(first, second):
        assert comps[0].completion_ids == comps[1].completion_ids == again[0].completion_ids
        c = comps[0]
        assert c.completion_ids == ref_greedy(model, c.prompt_ids, len(c.completion_ids))
        want = processed_logprobs(ref_logits(model, c.prompt_ids, c.completion_ids), c.completion_ids)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=1e-3, rtol=0)


def test_sampled_logprobs_follow_temperature_and_top_p(worker, paths):
    model = ref_model(paths["base"])
    s = SamplingConfig(n=4, temperature=0.7, top_p=0.9, max_tokens=6, seed=7)
    out = worker.generate([GenerationRequest(messages=MESSAGES[0], sampling=s)])[0]
    for c in out:
        logits = ref_logits(model, c.prompt_ids, c.completion_ids)
        want = processed_logprobs(logits, c.completion_ids, s.temperature, s.top_p)
        torch.testing.assert_close(torch.tensor(c.logprobs), want, atol=2e-3, rtol=0)
        raw = processed_logprobs(logits, c.completion_ids)
        assert not torch.allclose(torch.tensor(c.logprobs), raw, atol=1e-2)  # not the raw log-probs


def test_seeded_sampling_reproducible(worker):
    req = [GenerationRequest(prompt_ids=[1, 4093, 198], sampling=SamplingConfig(n=2, max_tokens=8, seed=11))]
    a, b = worker.generate(req)[0], worker.generate(req)[0]
    assert [c.completion_ids for c in a] == [c.completion_ids for c in b]


def test_seeded_batch_over_the_token_budget(worker):
    """Seeded requests whose prompts exceed one step's token budget together (24 x 700 tokens >
    vLLM's 4096): on CPU, chunked prefill of a seeded request used to crash vLLM 0.32."""
    reqs = [GenerationRequest(prompt_ids=long_prompt(700, seed=i),
                              sampling=SamplingConfig(n=2, temperature=0.7, max_tokens=4, seed=1000 + i))
            for i in range(24)]
    out = worker.generate(reqs)
    assert len(out) == 24 and all(len(o) == 2 and o[0].completion_ids for o in out)


def test_stop_strings_end_text_at_the_stop_and_keep_sampled_tokens(worker, tokenizer):
    s = SamplingConfig(n=4, temperature=1.0, max_tokens=16, seed=3, stop=["e"])
    for c in worker.generate([GenerationRequest(messages=MESSAGES[0], sampling=s)])[0]:
        full = tokenizer.decode(c.completion_ids, skip_special_tokens=True)
        assert "e" not in c.text[:-1] and full.startswith(c.text)
        assert len(c.logprobs) == len(c.completion_ids)
        if "e" in full:  # stopped on the token that completed the stop string; the text ends with it
            assert c.finish_reason == "stop" and c.text.endswith("e")
            assert "e" not in tokenizer.decode(c.completion_ids[:-1])


def test_a_generate_call_takes_the_cores_another_engine_frees(worker, tmp_path, monkeypatch):
    """Another engine computes when the call starts (the call gets half the cores) and finishes
    right after: the running call re-takes the whole machine between engine steps (vLLM) or
    batches (HF) instead of leaving the freed cores idle."""
    monkeypatch.setenv(runtime.CORES_DIR_ENV, str(tmp_path))
    monkeypatch.setenv(runtime.REBALANCE_ENV, "0.0001")
    monkeypatch.setattr(runtime, "has_gpu", lambda: False)
    monkeypatch.setattr(runtime, "cpu_cores", lambda: 4)
    other = tmp_path / f"{os.getpid()}.other-engine"
    other.touch()
    seen = []
    rebalance = runtime.rebalance

    def watch():
        seen.append(rebalance())
        other.unlink(missing_ok=True)  # the other engine's batch ends after our first step

    monkeypatch.setattr(runtime, "rebalance", watch)
    reqs = [GenerationRequest(messages=m, sampling=SamplingConfig(n=2, max_tokens=8, seed=5))
            for m in MESSAGES * 3]
    worker.generate(reqs)
    assert seen[0] == 2 and seen[-1] == 4, seen
    assert torch.get_num_threads() == 1  # idle again after the call


def test_sleep_wake_are_safe(worker):
    worker.sleep()
    worker.wake()
    out = worker.generate([GenerationRequest(prompt_ids=[1, 2, 3], sampling=SamplingConfig(max_tokens=2))])
    assert len(out[0][0].completion_ids) >= 1
    assert worker.ready()["engine"] in BACKENDS


# ---- weight updates -------------------------------------------------------------------------
def test_bad_update_is_rejected_and_engine_survives(worker, paths):
    good = read_safetensors_dir(paths["other"])
    with pytest.raises(ValueError, match="missing"):
        worker.load_weights(good[1:])
    bad = [(n, t[:-1] if i == 0 else t) for i, (n, t) in enumerate(good)]
    with pytest.raises(ValueError, match="wrong shapes"):
        worker.load_weights(bad)
    with pytest.raises(ValueError, match="unexpected"):
        worker.load_weights(good + [("model.extra.weight", torch.zeros(2))])
    out = worker.generate([GenerationRequest(prompt_ids=[1, 2, 3], sampling=SamplingConfig(max_tokens=2))])
    assert out[0][0].completion_ids


def test_load_weights_replaces_model_and_resets_prefix_cache(worker, paths):
    prompt = long_prompt()
    req = [GenerationRequest(prompt_ids=prompt, sampling=SamplingConfig(temperature=0.0, max_tokens=8))]
    base, other = ref_model(paths["base"]), ref_model(paths["other"])
    try:
        before = worker.generate(req)[0][0]      # fills the prefix cache with base-model KV
        assert before.completion_ids == ref_greedy(base, prompt, 8)

        worker.load_weights(read_safetensors_dir(paths["other"]))
        after = worker.generate(req)[0][0]
        want = ref_greedy(other, prompt, 8)
        assert after.completion_ids == want != before.completion_ids
        want_lp = processed_logprobs(ref_logits(other, prompt, want), want)
        torch.testing.assert_close(torch.tensor(after.logprobs), want_lp, atol=1e-3, rtol=0)

        # EOS is kept in completion_ids (with its log-prob) and ends the generation
        eos = worker.tokenizer.eos_token_id
        worker.load_weights(eos_weights(paths["base"], eos))
        reqs = [GenerationRequest(prompt_ids=[1, 520, 9531], sampling=SamplingConfig(temperature=0.0, max_tokens=8)),
                GenerationRequest(messages=MESSAGES[1], sampling=SamplingConfig(n=2, temperature=1.0, max_tokens=8))]
        for comps in worker.generate(reqs):
            for c in comps:
                assert c.completion_ids == [eos] and len(c.logprobs) == 1 and c.logprobs[0] > -0.1
                assert c.finish_reason == "stop" and c.text == ""
    finally:
        worker.load_weights_from_dir(paths["base"])
    assert worker.generate(req)[0][0].completion_ids == before.completion_ids


# ---- through Ray -----------------------------------------------------------------------------
@pytest.mark.parametrize("engine_process", [
    "in-process",
    # a second interpreter importing vLLM: 1-3 minutes on 2 shared cores
    pytest.param("engine-core-process", marks=pytest.mark.slow)])
def test_ray_actor_generate_and_weight_push(ray_session, paths, engine_process):
    """A vLLM RolloutWorker actor; rank 0 (this process) pushes new weights over the sync group.

    "engine-core-process" runs vLLM with V1 multiprocessing on, so the update travels to the
    engine as safetensors bytes instead of raw tensors.
    """
    ray = ray_session
    from marl_llm.weight_sync import WeightSyncGroup, free_port, meta_of

    env = {**runtime.actor_env(),
           "VLLM_ENABLE_V1_MULTIPROCESSING": "0" if engine_process == "in-process" else "1"}
    actor = ray.remote(RolloutWorker).options(num_cpus=1, runtime_env={"env_vars": env}).remote(
        paths["base"], BASE, RolloutConfig(backend="vllm"), 0, "p")
    try:
        info = ray.get(actor.ready.remote(), timeout=300)
        assert info["engine"] == "vllm" and info["in_process"] == (engine_process == "in-process")
        prompt = long_prompt(seed=1)
        req = [GenerationRequest(prompt_ids=prompt, sampling=SamplingConfig(temperature=0.0, max_tokens=6))]
        before = ray.get(actor.generate.remote(req), timeout=120)[0][0]
        assert before.completion_ids == ref_greedy(ref_model(paths["base"]), prompt, 6)

        port = free_port()
        joined = actor.init_weight_sync.remote("127.0.0.1", port, 1, 2, 60)
        group = WeightSyncGroup("127.0.0.1", port, 0, 2, timeout_s=60)
        assert ray.get(joined, timeout=60)
        # rank 0: a learner-like state dict (with the tied lm_head alias), pushed in one broadcast
        sd = dict(read_safetensors_dir(paths["other"]))
        sd["lm_head.weight"] = sd["model.embed_tokens.weight"]
        named = list(sd.items())
        done = actor.receive_weights.remote(meta_of(named))
        group.broadcast(named)
        assert ray.get(done, timeout=120) == 1
        group.close()

        after = ray.get(actor.generate.remote(req), timeout=120)[0][0]
        other = ref_model(paths["other"])
        want = ref_greedy(other, prompt, 6)
        assert after.completion_ids == want != before.completion_ids
        torch.testing.assert_close(torch.tensor(after.logprobs),
                                   processed_logprobs(ref_logits(other, prompt, want), want), atol=1e-3, rtol=0)
    finally:
        ray.get(actor.shutdown.remote(), timeout=60)
        ray.kill(actor)
