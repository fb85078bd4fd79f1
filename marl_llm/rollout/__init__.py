"""Rollout side: inference engines (vLLM, HF transformers) behind one interface, token-in/token-out.

Import the engines lazily: `import marl_llm.rollout` must not import vLLM or transformers.
"""
from marl_llm.rollout.backend import RolloutBackend, WeightSpec, prompt_ids_of, read_safetensors_dir
from marl_llm.rollout.worker import RolloutWorker, make_backend

__all__ = ["RolloutBackend", "RolloutWorker", "WeightSpec", "make_backend", "prompt_ids_of",
           "read_safetensors_dir"]
