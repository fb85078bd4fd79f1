"""The training loop shared by every algorithm: collect -> buffer -> update -> sync -> log/eval/save.

The loop knows no algorithm by name: it asks the registered plugin for its policies, builds them
on the cluster, and calls `prepare`, `collect`, `update` and `evaluate`.
"""
from __future__ import annotations

import json
import logging
import random
import shutil
import time
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path
from typing import Any

from omegaconf import OmegaConf

from marl_llm import cli
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.checkpoint import CheckpointManager, TaskStream, TrainerState
from marl_llm.cluster import Cluster
from marl_llm.config import RunConfig
from marl_llm.eval_store import save_evaluation
from marl_llm.jsonl import read_jsonl, write_jsonl
from marl_llm.metrics import MetricsLogger, PhaseTimer
from marl_llm.pipeline import RolloutProducer, staleness
from marl_llm.preflight import check_run, checkpoint_bytes, disk_free, size_text
from marl_llm.stats import DIFF, comparison_lines, read_intervals

log = logging.getLogger(__name__)
# the metrics prefix of each evaluated split (the dev split keeps the `eval/` keys of every report)
EVAL_KEYS = {"dev": "eval", "test": "test"}


def _progress(total: int, initial: int, enabled: bool):
    from tqdm.auto import tqdm
    return tqdm(total=total, initial=initial, desc="train", unit="step", disable=not enabled,
                dynamic_ncols=True)


def _save_config(run: RunConfig, out: Path) -> None:
    def plain(x):
        return asdict(x) if is_dataclass(x) else x
    data = {f.name: plain(getattr(run, f.name)) for f in fields(run)}
    (out / "config.yaml").write_text(OmegaConf.to_yaml(OmegaConf.create(data)))


def _first_record(path: Path) -> dict[str, Any] | None:
    if not path.exists():  # stopped between its first checkpoint and its first metrics line
        return None
    with open(path) as f:
        line = next((l for l in f if l.strip()), None)
    return json.loads(line) if line else None


class Trainer:
    def __init__(self, run: RunConfig):
        self.run = run
        self.out = Path(run.trainer.output_dir).resolve()
        self.ckpts = CheckpointManager(self.out, keep=run.trainer.keep_checkpoints)
        self.started = time.perf_counter()  # the summary's wall clock
        self.timer = PhaseTimer(origin=self.started)

    def _resume_point(self):
        if not self.run.trainer.resume:  # a folder with checkpoints was refused by the pre-flight check
            return None, TrainerState()
        ckpt = self.ckpts.latest()
        if ckpt is None:
            log.warning("trainer.resume=true but %s has no checkpoint: starting from step 0", self.out)
            return None, TrainerState()
        return ckpt, self.ckpts.load_state(ckpt)

    def _already_complete(self, ckpt: Path, step: int) -> dict[str, Any]:
        """A resume whose newest checkpoint is at or past trainer.steps: nothing to train, so
        nothing starts (no Ray, vLLM or DeepSpeed) and nothing in the run folder changes but the
        line train.log gets. Returns the run's summary.json as it is. A run that stopped between
        its last checkpoint and writing the summary has none of that step: that is said, nothing
        is written, and the run folder, step and checkpoint are returned (the final evaluation can
        be redone with `python -m marl_llm.evaluate run_dir=...`)."""
        log.info("the run in %s is already complete at step %d (trainer.steps=%d): nothing to do; to continue it, "
                 "resume with trainer.steps above %d", self.out, step, self.run.trainer.steps, step)
        path = self.out / "summary.json"
        try:
            summary = json.loads(path.read_text())
        except (OSError, ValueError):
            summary = None
        if isinstance(summary, dict) and summary.get("steps") == step:
            return summary
        log.warning("%s has no summary of step %d (the run stopped after its last checkpoint, before writing it); "
                    "left as it is. The final evaluation: python -m marl_llm.evaluate run_dir=%s", path, step, self.out)
        return {"output_dir": str(self.out), "steps": step, "checkpoint": str(ckpt)}

    def fit(self) -> dict[str, Any]:
        run, out = self.run, self.out
        ckpt, state = self._resume_point()
        if ckpt is not None and state.step >= run.trainer.steps:
            return self._already_complete(ckpt, state.step)
        # bad data, model or output folder: an error here, before any engine starts
        env, algo = check_run(run, output_dir=str(out))
        _save_config(run, out)
        random.seed(run.seed)
        state.restore_rng()

        specs = algo.policy_specs()
        cluster = Cluster(run.cluster)
        policies: dict[str, Any] = {}
        metrics = MetricsLogger(out, run.trainer.loggers)
        rollouts = None
        try:
            cluster.start(cluster.cpus_needed(specs, run), engine_log=out / "engines.log")
            cli.reclaim_signals()
            # ---- build: rollout workers for every policy, learner groups for trainable ones
            with self.timer("setup"):
                inits = {s.name: str(ckpt / s.name) if ckpt is not None and s.trainable else None for s in specs}
                policies.update(cluster.build_policies(specs, run, inits))
                for spec in specs:
                    if ckpt is not None and spec.trainable:
                        learner = policies[spec.name].learner
                        info = learner.load_state(str(ckpt / "_deepspeed" / spec.name))
                        if info.get("resharded_from"):
                            log.info("learner %r: checkpoint of learner.num_ranks=%d re-sharded for %d (DeepSpeed "
                                     "universal checkpoint: weights, Adam moments and step exact)", spec.name,
                                     info["resharded_from"], learner.world_size)
            buffer_path = out / "buffer.jsonl"
            if ckpt is not None:
                TrajectoryBuffer(buffer_path).truncate_to(state.buffer_total)
                metrics.truncate_after(state.step)
            buffer = TrajectoryBuffer(buffer_path, keep_last=10_000)
            buffer.total = state.buffer_total
            algo.setup(policies, buffer, self.timer)
            if state.algo:
                algo.load_state_dict(state.algo)

            # ---- data: the algorithm's one-off preparation is stored so resume reuses it
            tasks_path = out / "train_tasks.jsonl"
            if ckpt is not None and tasks_path.exists():
                tasks = read_jsonl(tasks_path, "the stored training tasks")
            else:
                with self.timer("prepare"):
                    tasks = algo.prepare(env.train_tasks())
                write_jsonl(tasks_path, tasks)
            stream = TaskStream(tasks, run.trainer.batch_size, run.seed)
            if state.data:
                stream.load_state_dict(state.data)
            # dev: the periodic evaluation (settings are chosen on it); test: once, after the last step
            evaluated = {split: env.tasks(split)[: run.trainer.eval_size] for split in run.trainer.eval_splits()}
            log.info("training %s on %s: %d train tasks, %s, steps %d -> %d", run.algo.name, run.env.name,
                     len(tasks), ", ".join(f"{len(v)} {k} tasks" for k, v in evaluated.items()) or "no evaluation",
                     state.step, run.trainer.steps)
            # the summary compares the run's first step with its last, also across resumes
            first = _first_record(out / "metrics.jsonl") if ckpt is not None else None
            last = None
            bar = _progress(run.trainer.steps, state.step, run.trainer.progress)
            setup_times = self.timer.pop()
            rollouts = RolloutProducer(algo, stream, state.step, run.trainer.steps, run.trainer.max_staleness,
                                       self.timer, self.started)
            trainable = [p for p in policies.values() if p.trainable]
            for step in range(state.step, run.trainer.steps):
                t0 = time.perf_counter()
                # ---- rollout: the algorithm drives its agents through its protocol (max_staleness
                # >= 1: collected in the background while the previous step trained)
                rollout = rollouts.next()
                episodes, fresh = staleness(rollout.episodes, {p.name: p.version for p in trainable},
                                            run.trainer.max_staleness)
                buffer.add(episodes)
                # ---- learn: credit assignment and one optimiser step per trainable policy
                record = {**algo.update(episodes, step), **fresh}
                # ---- sync: updated weights to the rollout workers (a rollout in flight finishes on
                # the weights it started with: the workers load the new ones between calls)
                with self.timer("sync"):
                    for name, p in policies.items():  # where a push's time goes: gather, broadcast, load
                        record.update({f"sync/{name}/{k}": v for k, v in p.sync_weights().items()
                                       if isinstance(v, (int, float))})
                rollouts.synced_through(step)
                # ---- checkpoint every k steps (and after the last), before evaluating: a failed
                # evaluation (e.g. an engine killed for memory) must not take the trained weights with it
                done = step + 1
                saved = run.trainer.save_every and (done % run.trainer.save_every == 0 or done == run.trainer.steps)
                if saved:
                    with self.timer("save"):
                        self._save(done, policies, rollouts.data_state(done), buffer, algo)
                # ---- evaluate on dev every k steps (and after the last), on test after the last
                try:
                    if run.trainer.eval_every and (done % run.trainer.eval_every == 0 or done == run.trainer.steps):
                        record.update(self._evaluate(algo, "dev", evaluated["dev"], done))
                    if run.trainer.test and done == run.trainer.steps:
                        record.update(self._evaluate(algo, "test", evaluated["test"], done))
                except BaseException:
                    metrics.log({"step": done, **record})  # the step's training metrics are kept
                    if saved:
                        log.error("the evaluation after step %d failed; the checkpoint of step %d is saved: score it "
                                  "with python -m marl_llm evaluate run_dir=%s", done, done, self.out)
                    raise
                record = {"step": done, **record, **rollout.phases, **rollout.spans, **self.timer.pop(),
                          **(setup_times if step == state.step else {}), "time/step": round(time.perf_counter() - t0, 4),
                          "time/wall": round(time.perf_counter() - self.started, 3)}
                metrics.log(record)
                first = first or record
                last = record
                bar.set_postfix({k.split("/")[-1]: f"{v:.3f}" for k, v in record.items()
                                 if k in ("reward/mean", "loss") and isinstance(v, float)})
                bar.update(1)
            bar.close()
            summary = self._summary(first, last)
            (out / "summary.json").write_text(json.dumps(summary, indent=2))
            self._report()
            return summary
        finally:
            if rollouts is not None:
                rollouts.close()
            metrics.close()
            cluster.shutdown(policies)

    def _evaluate(self, algo, split: str, tasks: list, done: int) -> dict[str, Any]:
        """`algo.evaluate` on `split`'s tasks after step `done`, as metrics `eval/...` (dev) or
        `test/...`; the per-task outcomes go to eval/<split>/step_<done>, so the run can be paired
        with another (python -m marl_llm compare)."""
        if not tasks:  # an empty split (the pre-flight check said so): nothing to score
            return {}
        key = EVAL_KEYS[split]
        with self.timer(key):
            metrics = {f"{key}/{k}": v for k, v in algo.evaluate(tasks).items()}
            save_evaluation(self.out / "eval" / split / f"step_{done}", tasks, algo)
        return metrics

    def _report(self) -> None:
        """The run's figures (trainer.report; a plotting failure is logged, the run's results stand)."""
        if not self.run.trainer.report:
            log.info("report: python -m marl_llm.report run_dir=%s", self.out)
            return
        from marl_llm.report import write_report
        try:
            log.info("report: %s", write_report([self.out]))
        except Exception:
            log.exception("writing the report failed; the run's outputs are complete, retry with "
                          "python -m marl_llm.report run_dir=%s", self.out)

    def _save(self, step: int, policies, data_state: dict[str, int], buffer: TrajectoryBuffer, algo) -> None:
        tmp = self.ckpts.staging(step)
        try:
            for name, p in policies.items():
                if p.learner is not None:
                    p.learner.save_hf(str(tmp / name))
                    p.learner.save_state(str(tmp / "_deepspeed" / name))
            state = TrainerState(step=step, data=data_state, buffer_total=buffer.total,
                                 algo=algo.state_dict())
            state.capture_rng()
            self.ckpts.commit(tmp, step, state)
        except BaseException as e:  # a dead rank or a signal mid-save: leave no half checkpoint behind
            shutil.rmtree(tmp, ignore_errors=True)
            each, free = checkpoint_bytes([p.spec for p in policies.values()]), disk_free(self.out)
            if isinstance(e, Exception) and each and free < each:  # the disk filled up since the start
                raise OSError(f"checkpoint step_{step} not written: {size_text(free)} free in "
                              f"{self.out}, a checkpoint of this run takes about {size_text(each)}; free space "
                              f"and continue with trainer.resume=true (from the last complete checkpoint)") from e
            raise

    def _summary(self, first, last) -> dict[str, Any]:
        """Training rewards of the first vs the last step, and the final evaluations (with the
        algorithm's baselines, e.g. MLPO's untrained leader) — what the run improved: every metric
        of the last step's dev evaluation (`eval`) and test evaluation (`test`); of the reported
        one (`reported`: test, else without one dev) those with a 95% interval as text
        (`intervals`: "0.31 [0.25, 0.38], n=200") and the paired comparisons of policies scored on
        the same held-out tasks as lines (`comparisons`: "acc/final - acc/untrained_final = +0.09
        [+0.04, +0.14], n=200"), which are also logged. `wall_clock_s`: seconds since the trainer
        was built."""
        summary: dict[str, Any] = {"output_dir": str(self.out), "steps": self.run.trainer.steps,
                                   "wall_clock_s": round(time.perf_counter() - self.started, 1)}
        if first and last:
            summary["train"] = {k: {"first": first[k], "last": last[k]} for k in sorted(set(first) & set(last))
                                if k.startswith("reward/") and isinstance(first[k], (int, float))}
            for key in EVAL_KEYS.values():
                summary[key] = {k[len(key) + 1:]: v for k, v in last.items() if k.startswith(f"{key}/")}
            # the number to report: the test evaluation, else (trainer.test=false) the last dev one
            reported = next((split for split in ("test", "dev") if summary[EVAL_KEYS[split]]), None)
            values = summary[EVAL_KEYS[reported]] if reported else {}
            summary["reported"] = reported
            summary["intervals"] = {name: str(iv) for name, iv in read_intervals(values).items()
                                    if not name.startswith(f"{DIFF}/")}
            summary["comparisons"] = comparison_lines(values)
            if reported:
                log.info("final evaluation (%s split), paired comparisons (95%% intervals):%s", reported,
                         "".join(f"\n  {line}" for line in summary["comparisons"]) or " none")
            else:
                log.info("no held-out evaluation in this run (trainer.test=false, trainer.eval_every=0); "
                         "python -m marl_llm.evaluate run_dir=%s split=dev scores its checkpoint", self.out)
        latest = self.ckpts.latest()
        summary["checkpoint"] = str(latest) if latest else None
        return summary
