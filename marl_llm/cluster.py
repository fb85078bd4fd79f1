"""Ray placement: start or join Ray, and build each policy's rollout workers and learner group.

`cluster=local` starts Ray on this machine (loopback, no dashboard); `cluster=ray` joins a running
cluster (`address=auto` under `ray job submit`, or `ray://HEAD:10001`). Everything Ray-specific
the trainer needs lives here.
"""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any, Optional

from marl_llm import cli, runtime
from marl_llm.config import ClusterConfig, LearnerConfig, RolloutConfig, RunConfig
from marl_llm.learner.lora import ADAPTER_DIR
from marl_llm.models import base_model_key, resolve_model
from marl_llm.deadlines import START_S
from marl_llm.policy import ActorFailed, ActorHung, Policy, PolicySpec, TrainGate, actor_label, describe_failure

log = logging.getLogger(__name__)


def rollout_gpus(rollout: RolloutConfig, resources: dict) -> float:
    """GPUs a rollout worker asks Ray for, so Ray sets its CUDA_VISIBLE_DEVICES and never stacks
    two engines (or an engine and a learner rank) on one device unless asked to (a fraction)."""
    if rollout.num_gpus is not None:
        return rollout.num_gpus
    return float(rollout.tensor_parallel_size) if resources.get("GPU", 0) > 0 else 0.0


def learner_gpus(learner: LearnerConfig, resources: dict) -> float:
    """GPUs a learner rank asks Ray for (one per rank on a GPU cluster, unless set)."""
    if learner.num_gpus is not None:
        return learner.num_gpus
    return 1.0 if resources.get("GPU", 0) > 0 else 0.0


def engine_key(spec: PolicySpec, rollout: RolloutConfig, init_path: Optional[str] = None) -> str:
    """Which engine (set of rollout workers) serves a policy; policies with equal keys share one.
    Frozen policies with the same weights share (nothing ever changes them): the same base model
    and the same checkpoint `init_path` (evaluating a checkpoint next to the initial model must not
    share); LoRA policies of one base share on vLLM (an adapter slot each, loaded per policy); any
    other trainable policy has its own."""
    if spec.model.lora is not None and rollout.backend == "vllm":
        return f"lora:{base_model_key(spec.model)}"
    if not spec.trainable:
        return f"frozen:{base_model_key(spec.model)}:{init_path or 'initial'}"
    return f"policy:{spec.name}"


class Cluster:
    def __init__(self, cfg: ClusterConfig):
        self.cfg = cfg
        self._started_here = False
        self.side_env: dict[str, dict[str, str]] = {"rollout": {}, "learner": {}}  # cluster.placement=split

    def start(self, cpus_needed: float = 0, engine_log: Optional[Path] = None) -> "Cluster":
        """Start or join Ray. With `engine_log` (and without --verbose) every actor's own output
        (vLLM, DeepSpeed) appends to that file instead of the driver's terminal."""
        runtime.apply_defaults()
        if self.cfg.name == "local":
            os.environ.setdefault("RAY_AUTH_MODE", "disabled")
        import ray

        self.ray = ray
        if self.cfg.placement == "split" and not runtime.has_gpu():
            self.side_env = {side: runtime.split_env(side) for side in self.side_env}
            log.info("cluster.placement=split: rollout workers on cores %s, learner ranks on cores %s",
                     self.side_env["rollout"][runtime.CPUS_ENV], self.side_env["learner"][runtime.CPUS_ENV])
        if ray.is_initialized():
            return self
        runtime_env: dict[str, Any] = {"env_vars": runtime.actor_env()}
        if engine_log is not None and not cli.verbose():
            runtime_env["env_vars"][runtime.ENGINE_LOG_ENV] = str(engine_log)
            runtime_env["worker_process_setup_hook"] = "marl_llm.runtime.redirect_engine_output"
            log.info("engine output (vLLM, DeepSpeed, Ray actors): %s (--verbose shows it here)", engine_log)
        if self.cfg.name == "local":
            # actors idle between phases, so logical CPUs may exceed physical cores
            num_cpus = self.cfg.num_cpus or max(os.cpu_count() or 1, int(cpus_needed + 0.999))
            # address="local": a new instance even when another Ray cluster runs on this machine
            ray.init(address="local", num_cpus=num_cpus, include_dashboard=False, namespace=self.cfg.namespace,
                     runtime_env=runtime_env, log_to_driver=True,
                     logging_level=logging.INFO if cli.verbose() else logging.WARNING)
            log.info("Ray started locally with %d logical CPUs", num_cpus)
        else:
            ray.init(address=self.cfg.address or "auto", namespace=self.cfg.namespace, runtime_env=runtime_env)
            log.info("joined Ray cluster at %s (%s CPUs)", self.cfg.address,
                     ray.cluster_resources().get("CPU"))
        self._started_here = True
        return self

    def get(self, refs, timeout: Optional[float] = None):
        return self.ray.get(refs, timeout=timeout)

    def build_policy(self, spec: PolicySpec, run: RunConfig, init_path: Optional[str] = None) -> Policy:
        return self.build_policies([spec], run, {spec.name: init_path})[spec.name]

    def build_policies(self, specs: list[PolicySpec], run: RunConfig,
                       init_paths: Optional[dict[str, Optional[str]]] = None) -> dict[str, Policy]:
        """Rollout workers for every policy; a ZeRO-3 learner group only for trainable ones.

        `init_paths[name]` (a checkpoint's HF folder) is what the rollout workers load on resume.
        The learner always starts from the base model, so its KL/DPO reference is the base model,
        and gets the trained weights and optimiser from the checkpoint's DeepSpeed state.

        Policies with the same `engine_key` share one set of rollout workers: frozen policies
        with the same base weights, whatever the algorithm calls them, and LoRA policies
        (`model.lora`) of one base on the vLLM backend (one adapter slot each; the rollout workers
        load a checkpoint's `adapter/` folder instead of its merged weights)."""
        init_paths = init_paths or {}
        groups: dict[str, list[PolicySpec]] = {}
        for s in specs:
            groups.setdefault(engine_key(s, run.rollout, init_paths.get(s.name)), []).append(s)
            if s.model.lora is not None and run.rollout.backend != "vllm":
                log.info("policy %r: rollout.backend=%s serves no LoRA adapters; the policy gets its own "
                         "engine and the learner pushes merged weights", s.name, run.rollout.backend)
        # every engine and learner group loads at once (much of a start is single-threaded: imports,
        # reading the model): the setup takes about as long as the slowest start, not their sum
        engines: dict[str, tuple[list, Optional[str]]] = {}
        adapter_loads: list[tuple[list, str, Path]] = []  # resumed LoRA adapters: (refs, policy, folder)
        for s in specs:  # actor creation returns at once; a shared engine starts with its first policy
            if s.name not in engines:
                engines.update(self._engine(groups[engine_key(s, run.rollout, init_paths.get(s.name))], run,
                                            init_paths, adapter_loads))
        from marl_llm.learner.group import LearnerGroup
        learners = {s.name: LearnerGroup(s.name, resolve_model(s.model), s.model, s.learner or run.learner, run.seed,
                                         s.reference, {**runtime.actor_env(), **self.side_env["learner"]}, wait=False)
                    for s in specs if s.trainable}
        for learner in learners.values():
            learner.wait_ready()
        for refs, name, saved in adapter_loads:
            self.get(refs, timeout=START_S)
            log.info("policy %r: serving the LoRA adapter saved in %s", name, saved)
        gate = TrainGate(run.learner.concurrent)
        policies = {}
        for s in specs:
            workers, adapter = engines[s.name]
            learner = learners.get(s.name)
            infos = self._ready(workers, s.name)
            log.info("policy %r: %d rollout worker(s) [%s%s] on nodes %s, %s", s.name, len(workers),
                     infos[0].get("engine", "?") if infos else "-",
                     f", LoRA adapter {adapter!r} on a shared engine" if adapter else "",
                     ", ".join(i.get("node", "?") for i in infos), "trainable" if learner else "frozen (rollout only)")
            policies[s.name] = Policy(s, workers, learner, get=self.get, adapter=adapter,
                                      timeout_s=run.rollout.timeout_s, worker_nodes=[i.get("node", "?") for i in infos],
                                      train_gate=gate)
            if infos:  # a resumed LoRA adapter is already at version 1 on its engine
                policies[s.name].version = (infos[0].get("adapter_versions", {}).get(adapter, 0) if adapter
                                            else infos[0].get("weight_version", 0))
        return policies

    def _engine(self, group: list[PolicySpec], run: RunConfig, init_paths: dict[str, Optional[str]],
                adapter_loads: list) -> dict[str, tuple[list, Optional[str]]]:
        """Start the rollout workers of one engine; returns name -> (workers, adapter) for the
        policies in `group` (those with one `engine_key`). A resumed LoRA adapter's load is queued
        on the workers (after their start) and appended to `adapter_loads` for the caller to wait
        on, so other engines and the learners start meanwhile."""
        first = group[0]
        if first.model.lora is not None and run.rollout.backend == "vllm":  # an adapter slot per policy
            lora = {"max_loras": len(group), "max_lora_rank": max(g.model.lora.r for g in group)}
            workers = self._rollout_workers(first, run, None, lora, "+".join(g.name for g in group))
            for g in group:
                saved = Path(init_paths[g.name]) / ADAPTER_DIR if init_paths.get(g.name) else None
                if saved is not None and saved.is_dir():
                    adapter_loads.append(([w.load_adapter_dir.remote(g.name, str(saved)) for w in workers],
                                          g.name, saved))
            return {g.name: (workers, g.name) for g in group}
        if len(group) > 1:  # frozen, same weights
            log.info("policies %s (frozen, same weights) share one set of rollout workers",
                     [g.name for g in group])
        workers = self._rollout_workers(first, run, init_paths.get(first.name), name="+".join(g.name for g in group))
        return {g.name: (workers, None) for g in group}

    def _ready(self, workers: list, policy: str) -> list[dict]:
        """The workers' info once their engines are up; one that does not come up within
        START_S (stuck loading, its node gone) is named as hung, like any other call."""
        try:
            return self.get([w.ready.remote() for w in workers], timeout=START_S)
        except Exception as e:  # noqa: BLE001 — re-raised naming the workers
            if type(e).__name__ != "GetTimeoutError":
                raise ActorFailed(f"rollout workers of policy {policy!r} failed to start: {describe_failure(e)}") from e
            names = ", ".join(f"actor {actor_label(w)}" for w in workers)
            raise ActorHung(f"rollout workers of policy {policy!r} ({names}) hung in start: its deadline of "
                            f"{START_S:.0f}s passed") from None

    def _rollout_workers(self, spec: PolicySpec, run: RunConfig, init_path: Optional[str],
                         lora: Optional[dict] = None, name: Optional[str] = None) -> list:
        from marl_llm.rollout.worker import RolloutWorker

        actor = self.ray.remote(RolloutWorker).options(
            num_cpus=run.rollout.num_cpus, num_gpus=rollout_gpus(run.rollout, self.ray.cluster_resources()),
            resources=run.rollout.resources, runtime_env={"env_vars": {**runtime.actor_env(), **self.side_env["rollout"]}})
        return [actor.remote(init_path or resolve_model(spec.model), spec.model, run.rollout, run.seed + i,
                             name or spec.name, lora) for i in range(run.rollout.num_workers)]

    def cpus_needed(self, specs: list[PolicySpec], run: RunConfig,
                    init_paths: Optional[dict[str, Optional[str]]] = None) -> float:
        init_paths = init_paths or {}
        engines = {engine_key(s, run.rollout, init_paths.get(s.name)) for s in specs}
        total = run.rollout.num_cpus * run.rollout.num_workers * len(engines)
        for s in specs:
            if s.trainable:
                lc = s.learner or run.learner
                total += lc.num_cpus * lc.num_ranks
        return total

    def shutdown(self, policies: dict[str, Any] | None = None) -> None:
        for p in (policies or {}).values():
            if p.learner is not None:
                try:
                    p.learner.shutdown()
                except Exception as e:  # noqa: BLE001 — shutting down anyway; say what failed
                    log.warning("learner %s did not shut down cleanly: %s", p.name, e)
        if self._started_here and self.cfg.name == "local":
            self.ray.shutdown()
