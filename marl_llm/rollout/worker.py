"""Rollout workers: one inference engine behind one interface, token-in/token-out.

`RolloutBackend` is what an engine implements (vLLM in `vllm_backend`, HF transformers in
`hf_backend`); `RolloutWorker` is the plain class the cluster code wraps with `ray.remote`. It
owns the tokenizer (chat templating happens here, in the worker process), validates every weight
update against the checkpoint's names and shapes before an engine sees it, and joins the
learner's weight broadcast (`marl_llm.weight_sync`).

LoRA policies on the vLLM backend share one engine per base model: the worker is started with
`lora` slots, every request names its policy's adapter, and a weight sync replaces that adapter
(`load_adapter`) instead of the engine's weights. Before its first adapter arrives a policy is
served by the plain base model, which is what a fresh adapter (B = 0) computes.
"""
from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import torch

from marl_llm import runtime
from marl_llm.config import LoraConfig, ModelConfig, RolloutConfig
from marl_llm.types import Completion, GenerationRequest

log = logging.getLogger(__name__)

NamedTensors = list[tuple[str, torch.Tensor]]


# ---- prompts ---------------------------------------------------------------------------------
def load_tokenizer(model_path: str):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(model_path)


def prompt_ids_of(tokenizer, request: GenerationRequest) -> list[int]:
    """The prompt token ids of a request: `prompt_ids` as given, or `messages` chat-templated.

    The template is rendered to text (with the generation prompt) and tokenised without adding
    special tokens again, the same way vLLM's own chat path does it.
    """
    if request.prompt_ids is not None:
        return [int(t) for t in request.prompt_ids]
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("the request has chat `messages` but the tokenizer has no chat template")
    text = tokenizer.apply_chat_template(request.messages, tokenize=False, add_generation_prompt=True)
    return list(tokenizer(text, add_special_tokens=False)["input_ids"])


def eos_ids(model_path: str, tokenizer) -> set[int]:
    """Every id that ends a generation: the tokenizer's EOS plus generation_config's."""
    ids: set[int] = set()
    if tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    gen = Path(model_path) / "generation_config.json"
    if gen.is_file():
        e = json.loads(gen.read_text()).get("eos_token_id")
        ids.update(int(x) for x in (e if isinstance(e, list) else [e] if e is not None else []))
    return ids


# ---- weights ---------------------------------------------------------------------------------
def read_safetensors_dir(path: str | os.PathLike) -> NamedTensors:
    """All tensors of a Hugging Face folder's `*.safetensors` files, in file order."""
    from safetensors import safe_open
    files = sorted(Path(path).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"{path} has no *.safetensors files")
    out: NamedTensors = []
    for f in files:
        with safe_open(str(f), framework="pt") as fh:
            out.extend((k, fh.get_tensor(k)) for k in fh.keys())
    return out


def checkpoint_spec(path: str | os.PathLike) -> dict[str, tuple[tuple[int, ...], str]]:
    """name -> (shape, dtype) of every tensor in a HF folder, read from the safetensors headers."""
    from safetensors import safe_open
    spec = {}
    for f in sorted(Path(path).glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as fh:
            for k in fh.keys():
                sl = fh.get_slice(k)
                spec[k] = (tuple(sl.get_shape()), str(sl.get_dtype()))
    return spec


class WeightSpec:
    """What a full update must contain, taken from the model folder the engine started from.

    A model with tied embeddings saves no `lm_head.weight`; an update may carry it (a learner's
    `state_dict()` has both names) as long as it has the embedding's shape. `normalise` returns the
    update with that alias dropped (`keep_lm_head=False`, vLLM loads the tied weight once) or
    added (`keep_lm_head=True`, `load_state_dict(strict=True)` wants both names).
    """

    LM_HEAD, EMBED = "lm_head.weight", "model.embed_tokens.weight"

    def __init__(self, model_path: str):
        self.shapes = {k: v[0] for k, v in checkpoint_spec(model_path).items()}
        if not self.shapes:
            raise FileNotFoundError(f"{model_path} has no safetensors weights to validate updates against")
        cfg = json.loads((Path(model_path) / "config.json").read_text())
        self.tied = bool(cfg.get("tie_word_embeddings", False)) and self.LM_HEAD not in self.shapes

    def normalise(self, named: Sequence[tuple[str, torch.Tensor]], keep_lm_head: bool) -> NamedTensors:
        named = list(named)
        names = [n for n, _ in named]
        dup = {n for n in names if names.count(n) > 1}
        if dup:
            raise ValueError(f"weight update names tensors twice: {sorted(dup)[:5]}")
        got = dict(named)
        if self.tied:
            head = got.pop(self.LM_HEAD, None)
            if head is not None and self.EMBED in self.shapes and tuple(head.shape) != self.shapes[self.EMBED]:
                raise ValueError(f"{self.LM_HEAD} {tuple(head.shape)} does not match the tied embedding "
                                 f"{self.shapes[self.EMBED]}")
        missing = sorted(set(self.shapes) - set(got))
        extra = sorted(set(got) - set(self.shapes))
        bad = [f"{k}: {tuple(got[k].shape)} != {self.shapes[k]}" for k in self.shapes
               if k in got and tuple(got[k].shape) != self.shapes[k]]
        nonfloat = [k for k, t in got.items() if not t.is_floating_point()]
        if missing or extra or bad or nonfloat:
            raise ValueError("weight update rejected (engine left untouched): it must be a full Hugging "
                             f"Face state dict of this model. missing={missing[:5]} ({len(missing)}), "
                             f"unexpected={extra[:5]} ({len(extra)}), wrong shapes={bad[:5]}, "
                             f"non-float={nonfloat[:5]}")
        out = [(n, t) for n, t in named if n in self.shapes]
        if keep_lm_head and self.tied:
            out.append((self.LM_HEAD, got[self.EMBED]))
        return out


# ---- the engine interface --------------------------------------------------------------------
class RolloutBackend(ABC):
    """One inference engine. Requests come with `prompt_ids` already set or with `messages`."""

    name: str = "?"
    version: str = "?"
    #: serves several LoRA adapters on one base (`lora` slots, `set_adapter`, `generate(adapter=)`)
    multi_lora: bool = False

    def __init__(self, model_path: str, model_cfg: ModelConfig, rollout_cfg: RolloutConfig,
                 seed: int, tokenizer=None, lora: Optional[dict] = None):
        self.model_path, self.model_cfg, self.rollout_cfg, self.seed = model_path, model_cfg, rollout_cfg, seed
        self.tokenizer = tokenizer if tokenizer is not None else load_tokenizer(model_path)
        self.spec = WeightSpec(model_path)
        self._warned: set[str] = set()

    def prompt_ids(self, request: GenerationRequest) -> list[int]:
        return prompt_ids_of(self.tokenizer, request)

    def log_once(self, key: str, msg: str, *args) -> None:
        if key not in self._warned:
            self._warned.add(key)
            log.info(msg, *args)

    @abstractmethod
    def generate(self, requests: Sequence[GenerationRequest], adapter: Optional[str] = None) -> list[list[Completion]]:
        """One list of `request.sampling.n` completions per request, in request order; with
        `adapter`, through that LoRA adapter (`set_adapter`)."""

    def set_adapter(self, name: str, path: str) -> None:
        """Serve adapter `name` from the peft folder `path` from now on (replacing an older one)."""
        raise NotImplementedError(f"the {self.name} rollout backend serves no LoRA adapters")

    @abstractmethod
    def load_weights(self, named_tensors: Sequence[tuple[str, torch.Tensor]]) -> None:
        """Replace ALL weights in place with a full Hugging Face-named state dict."""

    def sleep(self) -> None:
        self.log_once("sleep", "%s backend: sleep() is not supported here; no-op", self.name)

    def wake(self) -> None:
        self.log_once("wake", "%s backend: wake() is not supported here; no-op", self.name)

    def shutdown(self) -> None:
        pass

    def info(self) -> dict:
        return {"engine": self.name, "version": self.version}


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
    raise ValueError(f"rollout.backend={rollout_cfg.backend!r}: choose 'vllm' or 'hf'")


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
                "start_s": round(self.start_s, 2), "pid": os.getpid(), "weight_version": self.weight_version}

    def generate(self, requests: Sequence[GenerationRequest], adapter: Optional[str] = None) -> list[list[Completion]]:
        # template here, once, so both backends see token ids only
        reqs = [r if r.prompt_ids is not None else
                GenerationRequest(prompt_ids=prompt_ids_of(self.tokenizer, r), sampling=r.sampling)
                for r in requests]
        # an adapter with no weights yet is still B = 0: the base model serves it
        with runtime.compute_phase(self.rollout_cfg.threads):
            return self.backend.generate(reqs, adapter=adapter if self.adapter_versions.get(adapter) else None)

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
                                    timeout_s or self.rollout_cfg.weight_sync_timeout_s, backend=backend)
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
