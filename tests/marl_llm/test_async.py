"""The overlapped loop on the real engines (Ray actors, HF / vLLM rollout, DeepSpeed learners):
with trainer.max_staleness=1 the next step's rollout is generated while the learners train (the
timeline shows it), no trained sample is more than one weight version old, and the weights still
reach the rollout workers (the lag is exactly 1 after the first step, not growing). GRPO and a
two-agent MAGRPO, each agent versioned separately. A driver killed with rollouts in flight
resumes with every step logged once."""
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

pytestmark = pytest.mark.engine

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["env=toy", "model=tiny", "rollout.backend=hf", "trainer.batch_size=2", "algo.group_size=4",
          "rollout.max_new_tokens=16", "trainer.progress=false", "trainer.report=false", "trainer.max_staleness=1"]


def train(out: Path, *overrides, check=True):
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", *COMMON, f"trainer.output_dir={out}", *overrides],
                       capture_output=True, text=True, cwd=ROOT, timeout=900)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


def records(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def overlapped(recs: list[dict]) -> int:
    """Steps whose rollout ran while the previous step trained (timeline spans intersect)."""
    return sum(b["span/collect/start"] < a["span/train/end"] and b["span/collect/end"] > a["span/train/start"]
               for a, b in zip(recs, recs[1:]))


def test_grpo_rollout_overlaps_training_within_the_staleness_bound(tmp_path):
    train(tmp_path, "algo=grpo", "trainer.steps=5", "trainer.eval_every=0", "trainer.test=false",
          "trainer.save_every=0", "algo.eval_baselines=[]")
    recs = records(tmp_path)
    assert [r["staleness/policy/max"] for r in recs] == [0.0, 1.0, 1.0, 1.0, 1.0]
    assert all(r["staleness/dropped"] == 0.0 for r in recs)
    assert overlapped(recs) >= 2, [(r["span/collect/start"], r["span/train/end"]) for r in recs]
    assert all(0.5 < r["is_weight"] < 2.0 for r in recs)  # tis at the sampling temperature: near 1
    assert all(r["time/wall"] > 0 for r in recs) and recs[-1]["time/wall"] > recs[0]["time/wall"]


def test_magrpo_agents_are_versioned_separately(tmp_path):
    train(tmp_path, "algo=magrpo", "trainer.steps=4", "trainer.eval_every=0", "trainer.test=false",
          "trainer.save_every=0", "algo.eval_baselines=[]")
    recs = records(tmp_path)
    for agent in ("agent1", "agent2"):
        assert [r[f"staleness/{agent}/max"] for r in recs] == [0.0, 1.0, 1.0, 1.0]
    assert overlapped(recs) >= 1


@pytest.mark.slow
def test_kill_with_rollouts_in_flight_then_resume(tmp_path):
    """SIGKILL of the driver once step 2's checkpoint exists (step 3's rollout in flight); the
    resumed run logs every step once and trains steps 3..6 on batches drawn again."""
    tag = uuid.uuid4().hex  # inherited by Ray's processes and every actor: all of them are killed
    proc = subprocess.Popen([sys.executable, "-m", "marl_llm.train", *COMMON, f"trainer.output_dir={tmp_path}",
                             "algo=grpo", "trainer.steps=6", "trainer.save_every=2", "trainer.eval_every=0",
                             "trainer.test=false", "algo.eval_baselines=[]"], cwd=ROOT, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL, env={**os.environ, "MARL_LLM_FAULT_TAG": tag})
    deadline = time.time() + 600
    while not (tmp_path / "checkpoints" / "step_2").exists():
        assert proc.poll() is None and time.time() < deadline, "no step_2 checkpoint"
        time.sleep(0.2)
    for pid in tagged_pids(tag):
        os.kill(pid, signal.SIGKILL)
    proc.wait()
    train(tmp_path, "algo=grpo", "trainer.steps=6", "trainer.save_every=2", "trainer.eval_every=0",
          "trainer.test=false", "algo.eval_baselines=[]", "trainer.resume=true")
    steps = [r["step"] for r in records(tmp_path)]
    assert steps == [1, 2, 3, 4, 5, 6], steps
    trained = [json.loads(line)["step"] for line in (tmp_path / "buffer.jsonl").read_text().splitlines()]
    assert sorted(set(trained)) == [0, 1, 2, 3, 4, 5] and len(trained) == 6 * 2 * 4  # no batch twice
