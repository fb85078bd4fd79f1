"""Faults through the real engines (Ray actors, vLLM rollout, 2 DeepSpeed ZeRO-3 ranks).

A training run is started as a user starts it; once its first checkpoint exists, one rollout
worker actor or one learner rank is killed with SIGKILL (or the driver gets SIGTERM). The driver
must stop within its configured timeout with one `error:` line naming the dead actor, leave no
half checkpoint and no Ray process behind, and `trainer.resume=true` must continue from the
last checkpoint.
"""
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from helpers import tagged_pids

pytestmark = pytest.mark.engine  # training runs and Ray clusters

ROOT = Path(__file__).resolve().parents[2]
TIMEOUT_S = 60  # learner.timeout_s and rollout.timeout_s of these runs
TRAIN = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "learner.num_ranks=2",
         "rollout.backend=vllm", "trainer.batch_size=2", "algo.group_size=4", "rollout.max_new_tokens=16",
         "trainer.save_every=1", "trainer.eval_every=0", "trainer.test=false", "trainer.progress=false",
         "algo.eval_baselines=[]",  # one rollout worker, the one training uses: the one a kill -9 hits
         f"learner.timeout_s={TIMEOUT_S}", f"rollout.timeout_s={TIMEOUT_S}"]


def cmdline(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""


def start(out: Path, steps: int, *extra):
    tag = uuid.uuid4().hex
    env = {**os.environ, "MARL_LLM_FAULT_TAG": tag}
    proc = subprocess.Popen(TRAIN + [f"trainer.steps={steps}", f"trainer.output_dir={out}", *extra],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    return proc, tag


def wait_for_checkpoint(proc, out: Path, step: int, timeout: float = 600):
    deadline = time.time() + timeout
    while not (out / "checkpoints" / f"step_{step}" / "trainer_state.json").is_file():
        assert proc.poll() is None, f"run ended early: {proc.communicate()[1][-3000:]}"
        assert time.time() < deadline, "no checkpoint in time"
        time.sleep(0.2)


def assert_clean_stop(proc, tag: str, out: Path, t_fault: float, *needles, rc=None, limit_s=TIMEOUT_S + 30):
    _, err = proc.communicate(timeout=limit_s + 120)
    stopped = time.time() - t_fault
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert proc.returncode != 0 and (rc is None or proc.returncode == rc), (proc.returncode, err[-3000:])
    assert len(lines) == 1 and err.strip().splitlines()[-1] == lines[0], err[-3000:]
    for n in needles:
        assert n in lines[0], (n, lines[0])
    assert stopped < limit_s, stopped  # the configured timeout plus shutdown
    # no half checkpoint: every step folder is complete, no staging folder is left
    ckpts = out / "checkpoints"
    assert not list(ckpts.glob("*.tmp")), list(ckpts.iterdir())
    assert all((d / "trainer_state.json").is_file() for d in ckpts.glob("step_*"))
    # no Ray process left behind (workers notice their raylet is gone within seconds)
    deadline = time.time() + 30
    while (left := tagged_pids(tag)) and time.time() < deadline:
        time.sleep(0.5)
    assert not left, [cmdline(p) for p in left]
    print(f"\nstopped {stopped:.1f}s after the fault: rc={proc.returncode} {lines[0]}")
    return lines[0]


def assert_resumes(out: Path):
    last = max(int(d.name.split("_")[1]) for d in (out / "checkpoints").glob("step_*"))
    r = subprocess.run(TRAIN + [f"trainer.steps={last + 1}", "trainer.resume=true", f"trainer.output_dir={out}"],
                       capture_output=True, text=True, timeout=900, cwd=ROOT)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 2)), steps
    state = json.loads((out / "checkpoints" / f"step_{last + 1}" / "trainer_state.json").read_text())
    assert state["step"] == last + 1


def kill_actor(tag: str, cls: str) -> int:
    """SIGKILL one actor process of class `cls` (Ray titles them `ray::<Class>...`)."""
    deadline = time.time() + 30
    while time.time() < deadline:
        pids = sorted(p for p in tagged_pids(tag) if cmdline(p).startswith(f"ray::{cls}"))
        if pids:
            os.kill(pids[-1], signal.SIGKILL)
            return pids[-1]
        time.sleep(0.2)
    raise AssertionError(f"no {cls} actor found")


@pytest.mark.slow
@pytest.mark.parametrize("fault, needles, rc", [
    ("RolloutWorker", ["rollout worker", "ActorDiedError", "(actor "], 1),           # kill -9 a rollout worker
    ("LearnerWorker", ["learner group 'policy'", "on rank", "ActorDiedError"], 1),  # kill -9 one learner rank
    ("SIGTERM", ["interrupted by SIGTERM", "trainer.resume=true"], 128 + signal.SIGTERM),  # the driver
    ("SIGINT", ["interrupted by SIGINT", "trainer.resume=true"], 128 + signal.SIGINT),     # Ctrl-C
])
def test_fault_stops_cleanly_and_resumes(tmp_path, fault, needles, rc):
    out = tmp_path / "run"
    proc, tag = start(out, 40)
    wait_for_checkpoint(proc, out, 1)
    if fault.startswith("SIG"):
        proc.send_signal(getattr(signal, fault))
    else:
        kill_actor(tag, fault)
    assert_clean_stop(proc, tag, out, time.time(), *needles, rc=rc)
    assert_resumes(out)


@pytest.mark.slow
@pytest.mark.parametrize("fault, needles", [
    ("RolloutWorker", ["rollout worker", "ActorDiedError", "(actor "]),           # dies while the producer generates
    ("LearnerWorker", ["learner group 'policy'", "on rank", "ActorDiedError"]),  # dies while a rollout is in flight
])
def test_fault_during_overlap_stops_as_fast_and_resumes(tmp_path, fault, needles):
    """trainer.max_staleness=1: the rollout runs in the trainer's second thread; a dead actor on
    either side stops the run with the same one line, nothing written is lost."""
    out = tmp_path / "run"
    proc, tag = start(out, 40, "trainer.max_staleness=1")
    wait_for_checkpoint(proc, out, 1)
    kill_actor(tag, fault)
    assert_clean_stop(proc, tag, out, time.time(), *needles, rc=1)
    assert_resumes(out)


HANG_S = 20  # learner.timeout_s and rollout.timeout_s of the hang runs


@pytest.mark.slow
@pytest.mark.parametrize("point, needles", [
    # a rollout worker stopped in its 3rd generate call: the driver's generate deadline names it
    ("rollout.generate:3", ["rollout worker 0 of policy 'policy'", "hung in generate",
                            f"its deadline of {HANG_S}s (rollout.timeout_s, set) passed"]),
    # rank 1 stopped in its 3rd train step while rank 0 waits for it in a ZeRO-3 collective
    ("learner.train_step@1:3", ["learner group 'policy': rank 1", "hung in train_step",
                                "rank 0", "failed waiting for it in a collective"]),
    # rank 1 stopped entering its 2nd weight push (the ZeRO-3 gather rank 0 needs for the broadcast)
    ("learner.push_weights@1:2", ["learner group 'policy': rank 1", "hung in weight push"]),
])
def test_a_hung_actor_stops_the_run_within_its_deadline_and_resume_continues(tmp_path, point, needles):
    out = tmp_path / "run"
    timeouts = [f"learner.timeout_s={HANG_S}", f"rollout.timeout_s={HANG_S}"]
    tag = uuid.uuid4().hex
    env = {**os.environ, "MARL_LLM_FAULT_TAG": tag, "MARL_LLM_FAULT_STOP": point}
    proc = subprocess.Popen(TRAIN + ["trainer.steps=40", f"trainer.output_dir={out}", *timeouts],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=ROOT, env=env)
    wait_for_checkpoint(proc, out, 1)
    t_fault = time.time()  # the stop comes at step 2 or 3: within a few seconds of this
    line = assert_clean_stop(proc, tag, out, t_fault, *needles, "node ", rc=1, limit_s=HANG_S + 60)
    assert "ActorHung" in line
    assert_resumes(out)
