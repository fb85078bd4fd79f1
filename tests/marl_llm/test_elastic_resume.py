"""Resume on a different cluster shape, and a resume of a finished run.

Learner level (Ray + DeepSpeed, the tiny Llama, fp32): a checkpoint written by 2 ranks is loaded
by 1 rank and the reverse, under ZeRO-3, ZeRO-2 and stage 0; the steps after the load equal the
steps the writing group took from the same checkpoint. Through the CLI: a 2-rank GRPO run resumed
with 1 rank (and a 1-rank run with 2) logs the steps the uninterrupted run logs, and
`trainer.resume=true` on a finished run changes nothing and starts no engine.

Tolerances: 1 and 2 ranks add the same gradients in a different order (fp32), so the numbers agree
to fp32 rounding, not bit for bit: the tests allow 1e-5 relative, and 1e-9 absolute for the
losses (GRPO's surrogate is a zero-sum of advantages whose fp32 residue is ~1e-10).
"""
import json
import math
import os
import random
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from marl_llm import runtime  # noqa: E402
from marl_llm.config import LearnerConfig, ModelConfig  # noqa: E402
from marl_llm.losses import LossConfig  # noqa: E402
from marl_llm.types import Sample  # noqa: E402

pytest.importorskip("ray")
pytest.importorskip("deepspeed")
pytestmark = pytest.mark.engine  # every test here starts Ray and DeepSpeed (or a training run)

MODEL_CFG = ModelConfig(name="tiny", source="tiny")
PG = LossConfig(kind="pg", clip_eps=0.2, agg="token_mean")
REL = 1e-5


def make_samples(n: int, seed: int) -> list[Sample]:
    rng = random.Random(seed)
    return [Sample([1] + [rng.randrange(100, 3000) for _ in range(rng.randrange(2, 9))],
                   [rng.randrange(100, 3000) for _ in range(rng.randrange(2, 12))], advantage=rng.uniform(-1, 1))
            for _ in range(n)]


def max_diff(a, b) -> float:
    return max(abs(u - v) for x, y in zip(a, b, strict=True) for u, v in zip(x, y, strict=True))


def same_step(got: dict, ref: dict) -> str:
    assert got["global_step"] == ref["global_step"]
    out = []
    for k in ("loss", "grad_norm"):
        if k == "grad_norm" and math.isnan(ref[k]):  # stage 0 (plain AdamW) does not report it
            continue
        assert got[k] == pytest.approx(ref[k], rel=REL), (k, got[k], ref[k])
        out.append(f"{k} {got[k]:.9g} vs {ref[k]:.9g} (rel {abs(got[k] / ref[k] - 1):.1e})")
    return f"step {got['global_step']}: " + ", ".join(out)


@pytest.mark.parametrize("stage", [3, 2, 0])
def test_learner_state_moves_between_rank_counts(ray_session, tiny_model_path, tmp_path, stage):
    from marl_llm.learner.group import LearnerGroup

    def group(n):
        cfg = LearnerConfig(num_ranks=n, num_cpus=1, zero_stage=stage, lr=5e-3, micro_batch_size=2, bf16="false")
        return LearnerGroup("tiny", tiny_model_path, MODEL_CFG, cfg, 0, False, runtime.actor_env())

    batches = [make_samples(6, seed=s) for s in (11, 12, 13, 14)]
    probe = make_samples(4, seed=15)
    two = one = None
    try:
        two, one = group(2), group(1)
        # 2 ranks write at step 1; 1 rank resumes and takes the 2-rank group's steps 2 and 3
        two.train_step(batches[0], PG)
        two.save_state(str(tmp_path / "two"))
        ref = [two.train_step(b, PG) for b in batches[1:3]]
        ref_lp = two.logprobs(probe)
        info = one.load_state(str(tmp_path / "two"))
        assert info["resharded_from"] == (2 if stage else None)  # stage 0 holds whole copies
        assert one.counters() == {"global_steps": 1, "optimizer_steps": 1}
        got = [one.train_step(b, PG) for b in batches[1:3]]  # the 2nd one moves by the restored Adam moments
        lines = [f"ZeRO-{stage} 2 -> 1 ranks " + same_step(g, r) for g, r in zip(got, ref)]
        assert max_diff(one.logprobs(probe), ref_lp) < 1e-5
        assert not (tmp_path / "two" / "universal").exists()  # the re-sharding copy is removed

        # and back: 1 rank writes at step 3, 2 ranks resume
        one.save_state(str(tmp_path / "one"))
        ref = one.train_step(batches[3], PG)
        ref_lp = one.logprobs(probe)
        info = two.load_state(str(tmp_path / "one"))
        assert info["resharded_from"] == (1 if stage else None)
        assert two.counters() == {"global_steps": 3, "optimizer_steps": 3}
        lines.append(f"ZeRO-{stage} 1 -> 2 ranks " + same_step(two.train_step(batches[3], PG), ref))
        assert max_diff(two.logprobs(probe), ref_lp) < 1e-5
        print("\n" + "\n".join(lines))
    finally:
        for g in (two, one):
            if g is not None:
                g.shutdown()


# ---- through the CLI -------------------------------------------------------------------------------
# kl_coef: at ratio 1 with equal-length completions the GRPO surrogate is exactly 0, so without a
# KL term the logged loss would say nothing about the weights
TRAIN = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "rollout.backend=hf",
         "trainer.steps=4", "trainer.batch_size=2", "algo.group_size=4", "rollout.max_new_tokens=8",
         "algo.eval_baselines=[]", "algo.kl_coef=0.1", "learner.lr=0.001", "trainer.eval_every=4",
         "trainer.eval_size=4", "trainer.save_every=2", "trainer.report=false", "trainer.progress=false"]
COMPARED = ("loss", "kl_loss", "grad_norm", "reward/mean", "global_step")


def run(*args, timeout=900):
    t0 = time.time()
    # a Ray of its own even if another one (`ray start`) runs on this machine
    env = {**os.environ, "RAY_ADDRESS": "local"}
    r = subprocess.run(TRAIN + list(args), capture_output=True, text=True, timeout=timeout, env=env)
    assert r.returncode == 0, f"{args}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    return r, time.time() - t0


def records(out: Path) -> dict[int, dict]:
    return {r["step"]: r for r in map(json.loads, (out / "metrics.jsonl").read_text().splitlines())}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """4-step runs with 2 and with 1 rank, checkpoints at steps 2 and 4."""
    out = {}
    for n in (2, 1):
        out[n] = tmp_path_factory.mktemp(f"ranks{n}")
        run(f"learner.num_ranks={n}", f"trainer.output_dir={out[n]}")
    return out


@pytest.mark.slow  # command-line runs (~2 min); the learner-level test above stays in make test
def test_uninterrupted_runs_agree_across_rank_counts(uninterrupted):
    two, one = records(uninterrupted[2]), records(uninterrupted[1])
    assert sorted(two) == sorted(one) == [1, 2, 3, 4]
    for s in (1, 2, 3, 4):
        assert two[s]["reward/mean"] == one[s]["reward/mean"]  # the same samples
        for k in ("loss", "grad_norm"):
            assert two[s][k] == pytest.approx(one[s][k], rel=REL, abs=1e-9), (s, k, two[s][k], one[s][k])
    assert two[3]["kl_loss"] > 1e-6  # the compared loss is not a constant


@pytest.mark.slow  # command-line runs (~2 min); the learner-level test above stays in make test
@pytest.mark.parametrize("saved, resumed", [(2, 1), (1, 2)])
def test_resume_with_another_rank_count(uninterrupted, tmp_path, saved, resumed):
    out = tmp_path / "run"
    shutil.copytree(uninterrupted[saved], out)
    shutil.rmtree(out / "checkpoints" / "step_4")  # the run as it was after its step-2 checkpoint
    r, seconds = run(f"learner.num_ranks={resumed}", f"trainer.output_dir={out}", "trainer.resume=true")
    assert f"checkpoint of learner.num_ranks={saved} re-sharded for {resumed}" in r.stdout + r.stderr
    got, same, writer = records(out), records(uninterrupted[resumed]), records(uninterrupted[saved])
    assert sorted(got) == [1, 2, 3, 4]
    # references: the uninterrupted run that wrote the checkpoint, and the one with the resumed
    # rank count (it differs from the writer by the rank count's rounding from step 1 on)
    for ref in (writer, same):
        for s in (3, 4):  # 3: weights, data position, RNG; 4: also the Adam moments and step
            for k in COMPARED:
                assert got[s][k] == pytest.approx(ref[s][k], rel=REL, abs=1e-9), (s, k, got[s][k], ref[s][k])
    print(f"\n{saved} -> {resumed} ranks ({seconds:.0f}s):")
    for s in (3, 4):
        for k in ("loss", "grad_norm"):
            print(f"  step {s} {k}: {got[s][k]!r}; uninterrupted, {saved} ranks (wrote the checkpoint): "
                  f"{writer[s][k]!r} (rel {abs(got[s][k] / writer[s][k] - 1):.1e}); {resumed} ranks: "
                  f"{same[s][k]!r} (rel {abs(got[s][k] / same[s][k] - 1):.1e})")
    summary = json.loads((out / "summary.json").read_text())
    assert summary["eval"] and summary["intervals"] and summary["steps"] == 4
    # first vs last step of the run, not of the resumed part
    assert summary["train"]["reward/mean"] == {"first": got[1]["reward/mean"], "last": got[4]["reward/mean"]}


@pytest.mark.slow  # command-line runs (~2 min); the learner-level test above stays in make test
def test_resume_of_a_finished_run_changes_nothing(uninterrupted):
    out = uninterrupted[2]

    def files():  # train.log gets the one line saying so
        return {p: p.read_bytes() for p in out.rglob("*") if p.is_file() and p.name != "train.log"}

    before = files()
    r, seconds = run("learner.num_ranks=2", f"trainer.output_dir={out}", "trainer.resume=true")
    assert files() == before  # summary.json, metrics.jsonl, checkpoints, config.yaml, tensorboard: as they were
    assert "already complete at step 4" in r.stdout and "trainer.steps above 4" in r.stdout
    lines = r.stdout.splitlines()
    assert "\n".join(lines[lines.index("{"):]) == (out / "summary.json").read_text()  # printed as it is
    assert "Ray started" not in r.stdout + r.stderr
    assert seconds < 20, seconds  # no engine: a start of Ray and the learners alone takes longer
    print(f"\nresume of a finished run: {seconds:.1f}s")

    # without its summary (stopped after the last checkpoint): said, nothing written
    summary = out / "summary.json"
    kept = summary.read_bytes()
    summary.unlink()
    try:
        r, _ = run("learner.num_ranks=2", f"trainer.output_dir={out}", "trainer.resume=true")
        assert "no summary of step 4" in r.stdout and not summary.exists()
    finally:
        summary.write_bytes(kept)
