"""The engine interface of a rollout worker and what every engine shares: chat templating to
token ids, end-of-sequence ids, and validation of weight updates against the checkpoint.

`RolloutBackend` is what an engine implements (vLLM in `vllm_backend`, HF transformers in
`hf_backend`); `marl_llm.rollout.worker.RolloutWorker` hosts one.
"""
from __future__ import annotations

import json
import logging
import os
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Optional, Sequence

import torch

from marl_llm.config import ModelConfig, RolloutConfig
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
