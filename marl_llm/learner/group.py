"""LearnerGroup: the driver-side handle of one trainable policy's DeepSpeed data-parallel group.

`learner_cfg.num_ranks` Ray actors (one `LearnerWorker` each) are gang-scheduled through a
placement group; rank 0's node hosts the torch.distributed rendezvous. The group shards each
batch over the ranks (by length, so every rank gets a similar number of tokens), makes the
micro-batch count equal on all ranks, and passes the *global* sample/token counts so that the
ranks' losses add up to one objective (see `marl_llm.learner.worker`).

Failure handling: results are collected as they arrive, so an exception on any rank is raised
at once (naming the rank) instead of waiting on the ranks stuck in a collective. Every call has a
deadline (`learner.timeout_s`, or sized from the work: marl_llm/deadlines.py) and so does every
torch.distributed collective: a rank that stops answering (SIGSTOP, a lost node, a stuck
collective) is named as hung, with its node, the phase and the deadline that passed.
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Optional, Sequence

from marl_llm.config import LearnerConfig, ModelConfig
from marl_llm.deadlines import COLLECTIVE_GRACE_S, SAVE_S, START_S, Deadline, collective_seconds
from marl_llm.learner.worker import validate_samples
from marl_llm.losses import LossConfig
from marl_llm.policy import ActorFailed, ActorHung, actor_label, describe_failure
from marl_llm.types import PairSample, Sample

log = logging.getLogger(__name__)


def _length(s) -> int:
    if isinstance(s, PairSample):
        return 2 * len(s.prompt_ids) + len(s.chosen_ids) + len(s.rejected_ids)
    return len(s.prompt_ids) + len(s.completion_ids)


def shard_by_length(items: Sequence, world_size: int) -> list[list[int]]:
    """Indices per rank: longest first, dealt in snake order (0,1,..,W-1,W-1,..,0,...) so that
    counts differ by at most one and token totals stay close. Each shard stays sorted by length
    (similar lengths share micro-batches: less padding)."""
    order = sorted(range(len(items)), key=lambda i: -_length(items[i]))
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for k, i in enumerate(order):
        rnd, pos = divmod(k, world_size)
        shards[pos if rnd % 2 == 0 else world_size - 1 - pos].append(i)
    return shards


def _combine(results: list[dict]) -> dict[str, float]:
    """Per-rank metrics -> one dict: '*loss' keys add up (each rank holds its share of the global
    objective), other keys are weighted means; step counters and lr from rank 0."""
    out: dict[str, float] = {}
    total_w = sum(r.get("_weight", 0.0) for r in results)
    keys = {k for r in results for k in r}
    for k in sorted(keys):
        if k == "_weight":
            continue
        vals = [r[k] for r in results if k in r]
        if k.endswith("loss"):
            out[k] = float(sum(vals))
        elif k in ("grad_norm", "lr", "global_step", "n_micro"):
            out[k] = results[0].get(k, vals[0])
        elif k == "time_s":
            out[k] = float(max(vals))
        elif total_w > 0:
            out[k] = float(sum(r[k] * r.get("_weight", 0.0) for r in results if k in r) / total_w)
        else:
            out[k] = float(sum(vals) / len(vals))
    return out


def gradient_carrying(samples: list, loss: LossConfig) -> list:
    """The samples a PG step has to compute. Without a KL term, a sample whose advantage is 0
    adds exactly 0 to the loss and to the gradient (its surrogate is ratio x 0, clipped or not),
    and every aggregation divides by global counts taken over all samples, so dropping it leaves
    the step unchanged. In group-relative RL that is every group whose samples all got the same
    reward (all wrong, early on a hard task): often most of the batch, and compute-bound CPU
    learners would spend most of a step on zeros. If no sample carries a gradient, one is kept so
    the optimiser still takes its (zero-gradient) step as it would on the full batch."""
    if loss.kind != "pg" or loss.kl_coef:
        return samples
    carrying = [s for s in samples if s.advantage != 0.0]
    return carrying or samples[:1]


class LearnerGroup:
    def __init__(self, policy_name: str, model_path: str, model_cfg: ModelConfig, learner_cfg: LearnerConfig,
                 seed: int, need_reference: bool, env_vars: dict, start_timeout_s: float = START_S,
                 wait: bool = True):
        """Reserve the ranks and start them. `wait=False` returns once they are launched (they
        load the model meanwhile: the cluster starts every engine and learner group at once);
        `wait_ready()` then waits for them."""
        import ray
        from ray.util.placement_group import placement_group
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        from marl_llm.learner.worker import LearnerWorker

        self.ray = ray
        self.policy_name, self.cfg, self.model_cfg = policy_name, learner_cfg, model_cfg
        self.world_size = n = learner_cfg.num_ranks
        self._sync_workers: Optional[list] = None
        self._meta = None
        # train steps and scoring are sized by their tokens; pushes and saves by the fixed bounds
        self.deadlines = {phase: Deadline(phase, "learner.timeout_s", learner_cfg.timeout_s)
                          for phase in ("train_step", "logprobs")}
        self.info: list[dict] = []
        t0 = time.time()
        from marl_llm.cluster import learner_gpus

        gpus = learner_gpus(learner_cfg, ray.cluster_resources())
        bundle = {"CPU": learner_cfg.num_cpus, **({"GPU": gpus} if gpus else {}), **(learner_cfg.resources or {})}
        self.pg = placement_group([dict(bundle) for _ in range(n)], strategy=learner_cfg.placement.upper(),
                                  name=f"learner-{policy_name}-{id(self):x}")
        try:
            ray.get(self.pg.ready(), timeout=start_timeout_s)
        except Exception as e:
            ray.util.remove_placement_group(self.pg)
            raise RuntimeError(
                f"learner group {policy_name!r}: Ray could not reserve {n} x {bundle} within "
                f"{start_timeout_s:.0f}s (cluster has {ray.available_resources()}): {e}") from None
        addr, port = ray.get(_addr_and_port.options(
            num_cpus=0, scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, 0)).remote(),
            timeout=120)
        actor = ray.remote(LearnerWorker)
        self.actors = []
        for rank in range(n):
            self.actors.append(actor.options(
                num_cpus=learner_cfg.num_cpus, num_gpus=gpus, resources=learner_cfg.resources,
                max_restarts=0, max_concurrency=1,
                runtime_env={"env_vars": dict(env_vars or {})},
                scheduling_strategy=PlacementGroupSchedulingStrategy(self.pg, rank),
                name=None).remote(rank, n, addr, port, model_path, model_cfg, learner_cfg, seed,
                                  need_reference, policy_name))
        self._start = (t0, start_timeout_s)
        if wait:
            self.wait_ready()

    def wait_ready(self) -> "LearnerGroup":
        """Wait until every rank has built its DeepSpeed engine (a rank that fails or hangs is named)."""
        if self.info:
            return self
        t0, start_timeout_s = self._start
        try:
            self.info = self._get_all([a.ready.remote() for a in self.actors], "start", timeout=start_timeout_s)
        except Exception:
            self.shutdown()
            raise
        self.backend = self.info[0]["backend"]
        self.start_seconds = time.time() - t0
        log.info("DeepSpeed ZeRO-%d learner group '%s': %d ranks, %s (%.1fM params, %s, started in %.1fs); "
                 "nodes: %s (learner.placement=%s)", self.cfg.zero_stage, self.policy_name, self.world_size,
                 self.backend, self.info[0]["params"] / 1e6, "bf16" if self.info[0]["bf16"] else "fp32",
                 self.start_seconds, ", ".join(f"rank {i} {x.get('node', '?')}" for i, x in enumerate(self.info)),
                 self.cfg.placement)
        return self

    # ---- plumbing -------------------------------------------------------------------------------
    def rank_names(self) -> list[str]:
        nodes = [i.get("node", "?") for i in self.info] or ["?"] * len(self.actors)
        return [f"rank {i} (actor {actor_label(a)}, node {node})" for i, (a, node) in enumerate(zip(self.actors, nodes))]

    def _get_all(self, refs: list, what: str, timeout: Optional[float] = None,
                 names: Optional[list[str]] = None, deadline: Optional[Deadline] = None) -> list:
        """Results in order; the first failure is raised at once, naming its actor. A call that
        outlives `timeout` (or a rank that fails in a collective while a peer never answers)
        raises `ActorHung` naming the ranks that did not answer."""
        ray = self.ray
        names = names or self.rank_names()
        index = {r: i for i, r in enumerate(refs)}
        results: list[Any] = [None] * len(refs)
        pending = list(refs)
        end = None if timeout is None else time.time() + timeout
        why = (deadline.describe(timeout) if deadline is not None else
               f"its deadline of {timeout:.0f}s passed" if timeout is not None else "")
        while pending:
            wait = 5.0 if end is None else max(0.0, min(5.0, end - time.time()))
            ready, pending = ray.wait(pending, num_returns=1, timeout=wait)
            for r in ready:
                i = index[r]
                try:
                    results[i] = ray.get(r)
                except Exception as e:  # noqa: BLE001 — re-raised with context
                    if pending and _waited_on_peer(e):
                        self._raise_stuck(what, names, index, i, e, pending)
                    i, e = self._dead_peer(pending, index, i, e)
                    hint = "" if what == "start" or len(refs) == 1 else (
                        " (the other ranks may stay blocked in a collective until learner.timeout_s)")
                    raise ActorFailed(f"learner group {self.policy_name!r}: {what} failed on {names[i]}: "
                                      f"{describe_failure(e)}" + hint) from e
            if end is not None and time.time() >= end and pending:
                stuck = ", ".join(names[index[r]] for r in pending)
                raise ActorHung(f"learner group {self.policy_name!r}: {stuck} hung in {what}: {why}")
        return results

    def _raise_stuck(self, what: str, names: list[str], index: dict, i: int, e: Exception, pending: list) -> None:
        """Actor `i` gave up waiting for a peer in a collective. The other waiters give up too
        within a moment; whoever still has not answered then (stopped, stuck, its node gone) is
        the culprit, named as hung. A peer that died instead is named as failed."""
        from ray.exceptions import RayActorError

        waiters, end = [i], time.time() + COLLECTIVE_GRACE_S
        while pending and time.time() < end:
            ready, pending = self.ray.wait(pending, num_returns=1, timeout=max(0.0, end - time.time()))
            for r in ready:
                try:
                    self.ray.get(r)
                except RayActorError as dead:
                    raise ActorFailed(f"learner group {self.policy_name!r}: {what} failed on {names[index[r]]}: "
                                      f"{describe_failure(dead)}") from dead
                except Exception as other:  # noqa: BLE001 — another waiter giving up
                    if not _waited_on_peer(other):
                        raise ActorFailed(f"learner group {self.policy_name!r}: {what} failed on "
                                          f"{names[index[r]]}: {describe_failure(other)}") from other
                    waiters.append(index[r])
        if not pending:
            raise ActorFailed(f"learner group {self.policy_name!r}: {what} failed on {names[i]}: "
                              f"{describe_failure(e)}") from e
        stuck = ", ".join(names[index[r]] for r in pending)
        waited = ", ".join(names[w] for w in waiters)
        raise ActorHung(f"learner group {self.policy_name!r}: {stuck} hung in {what}; {waited} failed waiting for "
                        f"it in a collective ({describe_failure(e)})") from e

    def _dead_peer(self, pending: list, index: dict, i: int, e: Exception) -> tuple[int, Exception]:
        """A collective fails on the live peers of a dead actor too (e.g. a gloo "connection
        closed"): if one of the other calls reports its actor dead within a moment, name that one."""
        from ray.exceptions import RayActorError

        if isinstance(e, RayActorError) or not pending:
            return i, e
        ready, _ = self.ray.wait(pending, num_returns=len(pending), timeout=3.0)
        for r in ready:
            try:
                self.ray.get(r)
            except RayActorError as dead:
                return index[r], dead
            except Exception:  # noqa: BLE001 — another side effect of the same failure
                continue
        return i, e

    def _run(self, what: str, method: str, per_rank_args: Optional[list[tuple]] = None, timeout=None,
             deadline: Optional[Deadline] = None, **kw):
        refs = [getattr(a, method).remote(*(per_rank_args[i] if per_rank_args else ()), **kw)
                for i, a in enumerate(self.actors)]
        return self._get_all(refs, what, timeout=timeout, deadline=deadline)

    def _timed(self, phase: str, tokens: int, method: str, args: list[tuple]):
        return self._timed_async(phase, tokens, method, args)()

    def _timed_async(self, phase: str, tokens: int, method: str, args: list[tuple]) -> Callable[[], list]:
        """Dispatch a call sized by the tokens it puts through the model; returns a function that
        waits for it (its deadline counts from the dispatch) and feeds its rate to the next deadline."""
        deadline = self.deadlines[phase]
        t0 = time.time()
        limit = self._call_s(deadline.seconds(tokens))
        refs = [getattr(a, method).remote(*args[i]) for i, a in enumerate(self.actors)]

        def wait() -> list:
            out = self._get_all(refs, phase, timeout=max(0.0, t0 + limit - time.time()), deadline=deadline)
            deadline.observe(tokens, time.time() - t0)
            return out
        return wait

    def _call_s(self, seconds: float) -> float:
        """With several ranks the driver outwaits the ranks' own collective timeout, so a rank left
        waiting for a stopped peer reports first and the peer is named precisely."""
        if self.world_size == 1:
            return seconds
        return max(seconds, collective_seconds(self.cfg.timeout_s) + COLLECTIVE_GRACE_S)

    def _fixed_s(self, long: bool = False) -> float:
        """Deadline of a call that is not sized by tokens: a push (`collective_seconds`) or a
        checkpoint save/load (`SAVE_S` unless learner.timeout_s is set)."""
        if self.cfg.timeout_s is not None:
            return self._call_s(float(self.cfg.timeout_s))
        return SAVE_S if long else self._call_s(collective_seconds(None))

    def _micro_count(self, shards: list[list[int]]) -> int:
        mbs = max(1, self.cfg.micro_batch_size)
        return max(1, max(math.ceil(len(s) / mbs) for s in shards))

    # ---- training and scoring -------------------------------------------------------------------
    def train_step(self, samples: Sequence[Sample | PairSample], loss: LossConfig) -> dict[str, float]:
        """One optimiser step of `loss` over all `samples`, data-parallel over the ranks."""
        return self.train_step_async(samples, loss)()

    def train_step_async(self, samples: Sequence[Sample | PairSample], loss: LossConfig) -> Callable[[], dict]:
        """`train_step` dispatched: returns a function that waits for its metrics."""
        samples = list(samples)
        if not samples:
            raise ValueError(f"learner group {self.policy_name!r}: train_step got no samples")
        validate_samples(samples, loss)  # here, not on one rank while the others wait in a collective
        if loss.kind == "dpo":
            n_tokens = sum(len(s.chosen_ids) + len(s.rejected_ids) for s in samples)
        else:
            n_tokens = sum(len(s.completion_ids) for s in samples)
        n_samples = len(samples)
        # the normalisers count every sample; only the samples that carry a gradient are computed
        samples = gradient_carrying(samples, loss)
        shards = shard_by_length(samples, self.world_size)
        n_micro = self._micro_count(shards)
        args = [([samples[i] for i in sh], loss, n_samples, n_tokens, n_micro) for sh in shards]
        t0 = time.time()
        wait = self._timed_async("train_step", sum(_model_tokens(samples[i]) for i in range(len(samples))),
                                 "train_step", args)

        def result() -> dict[str, float]:
            out = _combine(wait())
            out.update(n_samples=n_samples, n_trained=len(samples), n_tokens=n_tokens, step_s=time.time() - t0)
            return out
        return result

    def logprobs(self, samples: Sequence[Sample], reference: bool = False) -> list[list[float]]:
        """Per completion token log-probs (fp32) of every sample, in the input order."""
        samples = list(samples)
        if not samples:
            return []
        shards = shard_by_length(samples, self.world_size)
        n_micro = self._micro_count(shards)
        args = [([samples[i] for i in sh], reference, n_micro) for sh in shards]
        parts = self._timed("logprobs", sum(map(_model_tokens, samples)), "logprobs", args)
        out: list[Any] = [None] * len(samples)
        for sh, part in zip(shards, parts):
            for i, lp in zip(sh, part):
                out[i] = lp
        return out

    def snapshot_reference(self) -> None:
        self._run("snapshot_reference", "snapshot_reference", timeout=self._fixed_s())

    # ---- weights out ----------------------------------------------------------------------------
    def save_hf(self, out_dir: str) -> str:
        """A Hugging Face folder (config, safetensors, tokenizer) of the current weights."""
        return self._run("checkpoint save (HF folder)", "save_hf", [(str(out_dir),)] * self.world_size,
                         timeout=self._fixed_s(long=True))[0]

    def save_state(self, out_dir: str) -> None:
        """DeepSpeed checkpoint for exact resume (weights, optimizer, step counters)."""
        self._run("checkpoint save (DeepSpeed state)", "save_state", [(str(out_dir),)] * self.world_size,
                  timeout=self._fixed_s(long=True))

    def load_state(self, in_dir: str) -> dict:
        return self._run("checkpoint load", "load_state", [(str(in_dir),)] * self.world_size,
                         timeout=self._fixed_s(long=True))[0]

    def push_weights(self, rollout_workers: list, worker_names: Optional[list[str]] = None,
                     timeout_s: Optional[float] = None) -> dict:
        """Gather the ZeRO-3 weights and broadcast them from learner rank 0 (sync rank 0) to the
        rollout workers (sync ranks 1..), which load them. The first call (or a new set of
        workers) sets up the sync group. Each part has a deadline (`timeout_s`, else
        learner.timeout_s, else `collective_seconds`): a rank or worker that stops answering is
        named as hung."""
        workers = list(rollout_workers)
        if not workers:
            return {}
        timeout = float(timeout_s or collective_seconds(self.cfg.timeout_s))
        names = self.rank_names() + (worker_names or [f"rollout worker {i} (actor {actor_label(w)})"
                                                      for i, w in enumerate(workers)])
        if self._sync_workers is None or [id(w) for w in self._sync_workers] != [id(w) for w in workers]:
            addr, port = self.ray.get(self.actors[0].node_addr_and_free_port.remote(), timeout=60)
            world = 1 + len(workers)
            refs = [a.init_weight_sync.remote(addr, port, world, timeout) for a in self.actors] + \
                   [w.init_weight_sync.remote(addr, port, i + 1, world, timeout) for i, w in enumerate(workers)]
            self._get_all(refs, "weight sync setup", timeout=timeout + 30, names=names)
            self._sync_workers = workers
            log.info("weight sync group for %r: learner rank 0 -> %d rollout worker(s) at %s:%d",
                     self.policy_name, len(workers), addr, port)
        if self._meta is None:
            self._meta = self.ray.get(self.actors[0].weight_meta.remote(), timeout=60)
        t0 = time.time()
        # one wait over both sides, so a dead worker is named even while rank 0 fails in the broadcast
        refs = [a.push_weights.remote() for a in self.actors] + \
               [w.receive_weights.remote(self._meta) for w in workers]
        res = self._get_all(refs, "weight push (learner gather + broadcast, worker receive + load)",
                            timeout=timeout + 30, names=names)
        out = dict(res[0] or {})
        out["push_s"] = time.time() - t0
        return out

    def push_adapter(self, rollout_workers: list, adapter: str, worker_names: Optional[list[str]] = None,
                     timeout_s: Optional[float] = None) -> dict:
        """A LoRA policy's sync: gather only the adapter (ZeRO-3, all ranks) and hand it to the
        rollout workers, which serve it as `adapter` on their shared base engine."""
        timeout = float(timeout_s or collective_seconds(self.cfg.timeout_s))
        t0 = time.time()
        state = self._run("adapter push (gather)", "adapter_state_dict", timeout=self._call_s(timeout))[0]
        t1 = time.time()
        ref = self.ray.put(state)
        refs = [w.load_adapter.remote(adapter, ref, self.model_cfg.lora) for w in rollout_workers]
        self._get_all(refs, "adapter push (load)", timeout=timeout,
                      names=worker_names or [f"rollout worker {i} (actor {actor_label(w)})"
                                             for i, w in enumerate(rollout_workers)])
        return {"gather_s": t1 - t0, "push_s": time.time() - t0,
                "bytes": sum(t.numel() * t.element_size() for t in state.values())}

    def counters(self) -> dict:
        """Rank 0's step counters: DeepSpeed's global_steps and AdamW's own step count."""
        a0 = self.actors[0]
        g, o = self.ray.get([a0.global_steps.remote(), a0.optimizer_step_count.remote()], timeout=60)
        return {"global_steps": g, "optimizer_steps": o}

    # ---- lifecycle ------------------------------------------------------------------------------
    def shutdown(self) -> None:
        ray = self.ray
        for a in getattr(self, "actors", []):
            try:
                ray.kill(a, no_restart=True)
            except Exception:  # noqa: BLE001 — already gone
                pass
        self.actors = []
        try:
            ray.util.remove_placement_group(self.pg)
        except Exception:  # noqa: BLE001
            pass


def _make_remote():
    import ray

    from marl_llm.weight_sync import node_addr_and_free_port
    return ray.remote(node_addr_and_free_port)


def _model_tokens(sample) -> int:
    """Tokens a sample puts through the model (a DPO pair: both sides)."""
    if isinstance(sample, PairSample):
        return len(sample.prompt_ids) + len(sample.chosen_ids) + len(sample.rejected_ids)
    return len(sample.prompt_ids) + len(sample.completion_ids)


def _waited_on_peer(e: BaseException) -> bool:
    """A rank's error that means it gave up waiting for a peer in a collective (gloo/NCCL timeout
    or a closed connection), not a failure of its own."""
    text = describe_failure(e).lower()
    return any(s in text for s in ("timed out", "timeout", "connection closed", "connection reset", "broken pipe"))


class _Lazy:
    """`ray.remote` at first use, so importing this module does not import Ray."""

    def __init__(self, make):
        self._make, self._fn = make, None

    def __getattr__(self, name):
        if self._fn is None:
            self._fn = self._make()
        return getattr(self._fn, name)


_addr_and_port = _Lazy(_make_remote)
