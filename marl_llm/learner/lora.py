"""LoRA policies (`model.lora` set): a frozen base model plus a low-rank adapter, via `peft`.

The learner wraps its base model with a peft LoRA adapter: only the adapter's parameters get
gradients and optimiser state (ZeRO-3 partitions base and adapter alike). Everything the learner
hands out keeps plain Hugging Face names: weight pushes and `save_hf` carry the base weights with
the adapter merged in (W + scale * B @ A), so rollout engines, resumes and `from_pretrained` see an
ordinary model of the base architecture; `save_hf` also writes the adapter alone (peft format,
`<folder>/adapter/`) for users who want to serve or share it.

Rollout: on the vLLM backend, LoRA policies with the same base model share ONE engine with an
adapter slot each; a sync gathers only the adapter and the engine serves it per request
(`marl_llm.cluster.Cluster.build_policies`, `RolloutWorker.load_adapter`). Backends without
multi-LoRA serving (hf) give the policy its own engine and receive the merged weights instead.
The learner saves what LoRA saves: gradients and AdamW state exist for the adapter only; each
policy's learner group still holds its own (frozen, partitioned) copy of the base.
"""
from __future__ import annotations

from typing import Any

from marl_llm.config import ConfigError, LoraConfig

PEFT_PREFIX = "base_model.model."
ADAPTER_DIR = "adapter"


def wrap(model: Any, cfg: LoraConfig) -> Any:
    """`model` with a fresh LoRA adapter (B = 0: the wrapped model computes exactly the base)."""
    import peft

    names = {n.rsplit(".", 1)[-1] for n, _ in model.named_modules()}
    missing = [m for m in cfg.target_modules if m not in names]
    if missing:
        raise ConfigError(f"model.lora.target_modules has {missing}, which this model does not have; "
                          f"linear layers of {type(model).__name__} are named e.g. "
                          f"{sorted(n for n in names if n.endswith('_proj'))[:8]}")
    pc = peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout,
                         target_modules=list(cfg.target_modules), bias="none", task_type="CAUSAL_LM")
    return peft.get_peft_model(model, pc)


def hf_name(name: str) -> str:
    """peft parameter name -> the base model's Hugging Face name (identity for plain models)."""
    return name.removeprefix(PEFT_PREFIX).replace(".base_layer.", ".")


def is_adapter_param(name: str) -> bool:
    return ".lora_" in name


def is_lora_layer(module: Any) -> bool:
    from peft.tuners.lora import LoraLayer
    return isinstance(module, LoraLayer)


def merged_weight(layer: Any):
    """The layer's effective weight, W + sum over active adapters of scale * B @ A (parameters must
    be gathered under ZeRO-3)."""
    w = layer.base_layer.weight
    for name in layer.active_adapters:
        if name in layer.lora_A:
            delta = layer.lora_B[name].weight @ layer.lora_A[name].weight
            w = w + layer.scaling[name] * (delta.T if getattr(layer, "fan_in_fan_out", False) else delta)
    return w


def adapter_key(name: str) -> str:
    """peft parameter name -> its key in a saved adapter (`adapter_model.safetensors`)."""
    return name.replace(".default.", ".")
