"""marl_llm: multi-agent LLM post-training on Ray, vLLM and DeepSpeed.

The Python API (marl_llm/api.py): `compose`, `train`, `evaluate` and `RunConfig`; imported on first
use, so `import marl_llm` stays light.
"""
__version__ = "0.1.0"
__all__ = ["RunConfig", "compose", "evaluate", "train", "__version__"]


def __getattr__(name: str):
    if name == "RunConfig":
        from marl_llm.config import RunConfig
        return RunConfig
    if name in ("compose", "evaluate", "train"):
        from marl_llm import api
        return getattr(api, name)
    raise AttributeError(f"module 'marl_llm' has no attribute {name!r}")
