"""Pre-flight: everything about a run that can be checked before Ray, vLLM or DeepSpeed start.

`check_run(run)` (the trainer and `evaluate` call it before the cluster starts) checks:
- the output folder (`check_output`): writable; holding checkpoints only with `trainer.resume=true`;
- every model the algorithm's policies use (`check_model`): a local folder must exist and hold a
  `config.json`; a Hub id while `HF_HUB_OFFLINE=1` must already be in the local Hub cache;
- the env's data: the files exist, parse, have rows and the required fields (the env's loader
  raises `DataError`), then prompts that do not fit `model.max_model_len - rollout.max_new_tokens`
  are dropped or truncated (`marl_llm.data.fit_prompts`).
Config values themselves are validated earlier, by `marl_llm.config.validate`.
Every failure is a `PreflightError` (a `ConfigError`): one line naming the value and what is allowed.
"""
from __future__ import annotations

import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Optional

from marl_llm.config import ConfigError, ModelConfig, RunConfig
from marl_llm.data import hub_offline

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


def _is_local_path(path: str) -> bool:
    """A Hub id is `name` or `owner/name`; anything else (or anything that exists) is a folder."""
    return (path.startswith(("/", ".", "~")) or path.count("/") > 1 or "\\" in path
            or Path(path).expanduser().exists())


def check_model(m: ModelConfig, key: str = "model") -> None:
    if m.source == "hf":
        path = str(m.path)
        if _is_local_path(path):
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
        key = repr(dataclasses.replace(s.model, name="", lora=None))
        if key in seen:
            continue
        seen.add(key)
        limit = s.model.max_model_len - run.rollout.max_new_tokens
        if limit <= 0:
            raise PreflightError(f"rollout.max_new_tokens={run.rollout.max_new_tokens} leaves no room for a prompt "
                                 f"in model.max_model_len={s.model.max_model_len} (policy {s.name!r}); "
                                 "lower rollout.max_new_tokens or raise model.max_model_len")
        env.fit_prompts(_tokenizer(s.model), limit)


def load_tasks(env) -> tuple[list, list]:
    """The env's (train, eval) tasks; a failure of its loader is a PreflightError naming the env."""
    from marl_llm.data import DataError
    try:
        return env.train_tasks(), env.eval_tasks()
    except DataError:
        raise
    except (FileNotFoundError, ValueError, KeyError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        raise PreflightError(f"env={env.cfg.name!r}: cannot load its data ({type(e).__name__}: {msg}); "
                             "check env.data.path and env.data.fields") from None


def check_run(run: RunConfig, *, output_dir: Optional[str] = None, resume: Optional[bool] = None,
              train: bool = True):
    """Check a validated run before the cluster starts; returns (env, algorithm) ready to use, the
    env's tasks already loaded and fitted to the models."""
    from marl_llm.registry import ALGORITHMS, ENVS

    if output_dir is not None:
        check_output(output_dir, run.trainer.resume if resume is None else resume)
    env = ENVS.get(run.env.name)(run.env, seed=run.seed)
    algo = ALGORITHMS.get(run.algo.name)(run.algo, env, run)
    specs = algo.policy_specs()
    for s in specs:
        check_model(s.model, "model" if s.model == run.model else f"model of policy {s.name!r}")
    train_tasks, eval_tasks = load_tasks(env)
    if train and not train_tasks:
        raise PreflightError(f"env={run.env.name!r} has no training tasks; give data with at least one task")
    if not eval_tasks and (not train or run.trainer.eval_every):
        log.warning("env=%r has no evaluation tasks", run.env.name)
    fit_env_prompts(env, specs, run)
    return env, algo
