"""Rollout workers: one inference engine behind one interface, token-in/token-out.

An engine implements `marl_llm.rollout.backend.RolloutBackend` (vLLM in `vllm_backend`, HF
transformers in `hf_backend`); `RolloutWorker` is the plain class the cluster code wraps with
`ray.remote`. It
owns the tokenizer (chat templating happens here, in the worker process), validates every weight
update against the checkpoint's names and shapes before an engine sees it, and joins the
learner's weight broadcast (`marl_llm.weight_sync`).

LoRA policies on the vLLM backend share one engine per base model: the worker is started with
`lora` slots, every request names its policy's adapter, and a weight sync replaces that adapter
(`load_adapter`) instead of the engine's weights. Before its first adapter arrives a policy is
served by the plain base model, which is what a fresh adapter (B = 0) computes.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path
from typing import Optional, Sequence

import torch

from marl_llm import runtime
from marl_llm.config import LoraConfig, ModelConfig, RolloutConfig
from marl_llm.deadlines import collective_seconds
from marl_llm.rollout.backend import (RolloutBackend, load_tokenizer, prompt_ids_of,
                                      read_safetensors_dir)
from marl_llm.types import Completion, GenerationRequest

log = logging.getLogger(__name__)


def backend_class(name: str) -> type[RolloutBackend]:
    if name == "vllm":
        from marl_llm.rollout.vllm_backend import VLLMBackend
        return VLLMBackend
    if name == "hf":
        from marl_llm.rollout.hf_backend import HFBackend
        return HFBackend
    raise ValueError(f"rollout.backend={name!r}: choose 'vllm' or 'hf'")


def make_backend(model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig, seed: int,
                 tokenizer=None, lora: Optional[dict] = None) -> RolloutBackend:
    cls = backend_class(rollout_cfg.backend)
    if lora and not cls.multi_lora:
        raise ValueError(f"the {cls.name} rollout backend serves no LoRA adapters (lora slots {lora})")
    return cls(model_path, model_cfg, rollout_cfg, seed, tokenizer, **({"lora": lora} if lora else {}))


# ---- the worker (wrapped with ray.remote by the cluster code) ---------------------------------
class RolloutWorker:
    """Hosts one backend for one policy. Every method is safe to call through a Ray actor."""

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                 seed: int, policy_name: str, lora: Optional[dict] = None):
        runtime.apply_defaults()
        if not runtime.has_gpu():
            runtime.set_threads(1)  # idle; `generate` takes this engine's share of the cores
        self.policy_name = policy_name
        self.model_path = str(model_path)
        self.rollout_cfg = rollout_cfg
        t0 = time.perf_counter()
        self.tokenizer = load_tokenizer(self.model_path)
        self.backend = make_backend(self.model_path, model_cfg, rollout_cfg, seed, self.tokenizer, lora)
        self.start_s = time.perf_counter() - t0
        self.sync = None
        self.weight_version = 0
        self.adapter_dir = Path(tempfile.mkdtemp(prefix="marl_llm_adapters_")) if lora else None
        self.adapter_versions: dict[str, int] = {}
        log.info("rollout worker for policy %r: %s %s ready in %.1fs", policy_name,
                 self.backend.name, self.backend.version, self.start_s)

    def ready(self) -> dict:
        return {**self.backend.info(), "policy": self.policy_name, "model_path": self.model_path,
                "start_s": round(self.start_s, 2), "pid": os.getpid(), "weight_version": self.weight_version,
                "adapter_versions": dict(self.adapter_versions),
                "node": runtime.node_label()}

    def generate(self, requests: Sequence[GenerationRequest], adapter: Optional[str] = None) -> list[list[Completion]]:
        runtime.fault_point("rollout.generate")
        # template here, once, so both backends see token ids only
        reqs = [r if r.prompt_ids is not None else
                GenerationRequest(prompt_ids=prompt_ids_of(self.tokenizer, r), sampling=r.sampling)
                for r in requests]
        # an adapter with no weights yet is still B = 0: the base model serves it
        with runtime.compute_phase(self.rollout_cfg.threads):
            out = self.backend.generate(reqs, adapter=adapter if self.adapter_versions.get(adapter) else None)
        version = self.adapter_versions.get(adapter, 0) if adapter else self.weight_version
        for comps in out:  # the weights these came from: the trainer bounds their staleness
            for c in comps:
                c.version = version
        return out

    def tokenize(self, messages: list[dict[str, str]], completion: str) -> tuple[list[int], list[int]]:
        """A chat prompt's ids exactly as `generate` templates it, and a completion's ids + EOS
        (a model trained on it learns to stop after it)."""
        prompt_ids = prompt_ids_of(self.tokenizer, GenerationRequest(messages=messages))
        completion_ids = list(self.tokenizer(completion, add_special_tokens=False)["input_ids"])
        if self.tokenizer.eos_token_id is not None:
            completion_ids.append(int(self.tokenizer.eos_token_id))
        return prompt_ids, completion_ids

    # ---- LoRA adapters (shared engine) -----------------------------------------------------
    def load_adapter(self, name: str, tensors: dict, lora: LoraConfig) -> int:
        """Write a pushed adapter as a peft folder and serve it as `name` (the old one is dropped)."""
        import peft
        from safetensors.torch import save_file

        if self.adapter_dir is None:
            raise RuntimeError(f"rollout worker {self.policy_name!r} was started without LoRA slots")
        version = self.adapter_versions.get(name, 0) + 1
        folder = self.adapter_dir / f"{name}-v{version}"
        peft.LoraConfig(r=lora.r, lora_alpha=lora.alpha, lora_dropout=lora.dropout, bias="none",
                        target_modules=list(lora.target_modules), task_type="CAUSAL_LM",
                        base_model_name_or_path=self.model_path).save_pretrained(str(folder))
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "adapter_model.safetensors"))
        return self._serve(name, folder, version)

    def load_adapter_dir(self, name: str, path: str) -> int:
        """Serve `name` from a saved adapter (a checkpoint's `<policy>/adapter`)."""
        if self.adapter_dir is None:
            raise RuntimeError(f"rollout worker {self.policy_name!r} was started without LoRA slots")
        version = self.adapter_versions.get(name, 0) + 1
        folder = self.adapter_dir / f"{name}-v{version}"
        shutil.copytree(path, folder)
        return self._serve(name, folder, version)

    def _serve(self, name: str, folder: Path, version: int) -> int:
        self.backend.set_adapter(name, str(folder))
        old = self.adapter_dir / f"{name}-v{version - 1}"
        if old.exists():
            shutil.rmtree(old, ignore_errors=True)
        self.adapter_versions[name] = version
        return version

    # ---- weights ---------------------------------------------------------------------------
    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> int:
        self.backend.load_weights(list(named_tensors))
        self.weight_version += 1
        return self.weight_version

    def load_weights_from_dir(self, path: str) -> int:
        return self.load_weights(read_safetensors_dir(path))

    def init_weight_sync(self, master_addr: str, master_port: int, rank: int, world_size: int,
                         timeout_s: float | None = None, backend: str | None = None) -> bool:
        """Join the learner's weight-sync group as `rank` (>= 1; the learner's rank 0 is 0).

        `backend`: "gloo" (CPU) or "nccl" (GPU); default: nccl when CUDA is available. The
        learner's rank 0 must use the same.
        """
        from marl_llm.weight_sync import WeightSyncGroup
        if self.sync is not None:
            self.sync.close()
        backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
        self.sync = WeightSyncGroup(master_addr, master_port, rank, world_size,
                                    timeout_s or collective_seconds(None), backend=backend)
        return True

    def receive_weights(self, meta) -> int:
        """Join the broadcast rank 0 starts with the same meta, then load the result."""
        if self.sync is None:
            raise RuntimeError("receive_weights before init_weight_sync")
        t0 = time.perf_counter()
        named = self.sync.receive(meta)
        t1 = time.perf_counter()
        version = self.load_weights(named)
        log.info("policy %r: received weights in %.3fs, loaded in %.3fs (version %d)",
                 self.policy_name, t1 - t0, time.perf_counter() - t1, version)
        return version

    # ---- lifecycle -------------------------------------------------------------------------
    def sleep(self) -> None:
        self.backend.sleep()

    def wake(self) -> None:
        self.backend.wake()

    def shutdown(self) -> None:
        if self.sync is not None:
            self.sync.close()
            self.sync = None
        self.backend.shutdown()
        if self.adapter_dir is not None:
            shutil.rmtree(self.adapter_dir, ignore_errors=True)
