"""Learning against the reference implementation: a marl_llm GRPO run's settings, tasks and reward
run in TRL's GRPOTrainer, step by step, then scored on the run's held-out test split by marl_llm's
own evaluator; and a report of both per step and per second over seeds.

    python -m bench.trl_parity --run RUN --out DIR [--steps N] [--threads 2] [--no-test]
    python -m bench.trl_parity --score MODEL_DIR --run RUN --out DIR
    python -m bench.trl_parity --report DIR1 DIR2 ... --marl RUN1 RUN2 ... [--figure PNG] [--md FILE]

Training (one seed per process): RUN is a finished `+experiment=...` GRPO run folder. Its
config.yaml is the configuration (env, model, seed, sizes, sampling, optimiser); the tasks of each
step are the ones marl_llm trained on, in its order: read from RUN/buffer.jsonl and checked against
the trainer's TaskStream rebuilt from RUN/train_tasks.jsonl and the run's seed (a mismatch stops
here). TRL's trainer is set up by bench.trl_step.grpo_trainer (the `vs_trl` bench's mapping: Dr.
GRPO loss, the run's clip, no KL, on-policy, constant lr, the learner's AdamW settings and grad
clip, the rollout's temperature / top_p / max_new_tokens / stop strings, the env's
`reward(...).total` as the only reward function), with TRL's own generation (`use_vllm=False`,
`model.generate`) at `--threads` threads (2: TRL's best on 2 cores, docs/BENCHMARKS.md). Written to
DIR: `trl_steps.jsonl` (per step: the mean reward of its G x batch samples and each reward
component's mean, e.g. `reward/correct`, the reasoning-gym scorer's strict reading; `wall_s`, the
seconds since `trainer.train()` began; whether TRL's prompt tokens and tasks are the run's),
`model/` (the trained weights as marl_llm saves a policy: the base model's tokenizer and generation
defaults, rope_theta in config.json), `summary.json`, and then the held-out
evaluation: `config.yaml` (RUN's, with trainer.output_dir=DIR) and

    python -m marl_llm.evaluate run_dir=DIR out=DIR/eval_test.json \\
        model.source=hf model.path=DIR/model algo.eval_baselines=[]

i.e. the run's evaluation (the first `trainer.eval_size` test tasks, greedy, the same readings)
of the saved model; DIR has no checkpoint, so the evaluator scores `model.path`. The untrained
model's numbers are the run's own (`test/base/...`: same tasks, same decoding).

`--score MODEL_DIR` runs only that evaluation, of any saved model folder: on the run's own
checkpoint (`RUN/checkpoints/step_24/policy`) it must reproduce the run's final test numbers,
which checks the route.

Report: pairs each DIR with the marl_llm run of the same seed and prints (and writes to `--md`) a
markdown table and the agreement statements (`parity`); `--figure` draws reward per step and per
second for both implementations (mean over seeds, band: +-1 sd across seeds).
"""
from __future__ import annotations

import time

STARTED = time.perf_counter()  # the process's start: TRL's setup time counts from here

import argparse  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import resource  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any, Optional, Sequence  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")
from bench.trl_step import first_episodes_by_step  # noqa: E402  (applies marl_llm's runtime defaults)

STEPS_FILE, SUMMARY_FILE, EVAL_FILE, MODEL_DIR = "trl_steps.jsonl", "summary.json", "eval_test.json", "model"
# each held-out reading: its metric and the untrained model's (the run's `base/` evaluation)
READINGS = {"strict": ("correct", "base/correct"), "lenient": ("lenient/correct", "lenient/base/correct")}
EXCLUDED_PHASES = ("time/test", "time/eval", "time/save")  # in a step's time/step, not training


# ---- the run folder --------------------------------------------------------------------------
def load_run(run_dir: str | os.PathLike, *dotted: str):
    """The validated RunConfig of a run folder (its config.yaml), with `key=value` changes."""
    from omegaconf import OmegaConf

    from marl_llm.config import validate
    cfg = OmegaConf.load(Path(run_dir, "config.yaml"))
    return validate(OmegaConf.merge(cfg, OmegaConf.from_dotlist(list(dotted))) if dotted else cfg)


def step_tasks(run_dir: str | os.PathLike, run) -> list[list[dict]]:
    """The tasks of each step in the order marl_llm trained on them: RUN/buffer.jsonl's groups,
    checked against the trainer's TaskStream rebuilt from RUN/train_tasks.jsonl and the run's
    seed and batch size; ValueError names the first step where they differ."""
    from marl_llm.checkpoint import TaskStream
    from marl_llm.jsonl import read_jsonl

    trained = [[ep["task"] for ep in eps] for eps in first_episodes_by_step(run_dir)]
    stream = TaskStream(read_jsonl(Path(run_dir, "train_tasks.jsonl"), "the run's training tasks"),
                        run.trainer.batch_size, run.seed)
    for i, tasks in enumerate(trained):
        expected = stream.next_batch()
        if tasks != expected:
            raise ValueError(f"{run_dir}: step {i + 1} trained on {[t.get('id') for t in tasks]}, but the TaskStream of "
                             f"train_tasks.jsonl (seed {run.seed}) gives {[t.get('id') for t in expected]}")
    if len(trained) != run.trainer.steps:
        raise ValueError(f"{run_dir}: buffer.jsonl holds {len(trained)} steps, the run's trainer.steps is "
                         f"{run.trainer.steps} (an unfinished run?)")
    return trained


def prompt_ids_by_step(run_dir: str | os.PathLike) -> list[list[Optional[list[int]]]]:
    """The prompt tokens marl_llm's rollout used for each group of each step (None if not stored)."""
    return [[(ep.get("turns") or [{}])[0].get("prompt_ids") for ep in eps] for eps in first_episodes_by_step(run_dir)]


# ---- TRL training ----------------------------------------------------------------------------
def _unique(rows: Sequence) -> list:
    """`rows` without consecutive repeats (G samples of a group are consecutive)."""
    return [r for i, r in enumerate(rows) if i == 0 or r != rows[i - 1]]


def train(run_dir: str, out: str, steps: Optional[int] = None, threads: int = 2) -> dict:
    """TRL's GRPOTrainer on the run's settings and tasks; per-step records, the saved model, summary."""
    from marl_llm import runtime
    run = load_run(run_dir)
    tasks = step_tasks(run_dir, run)[:steps]
    prompts = prompt_ids_by_step(run_dir)
    runtime.set_threads(threads)

    import torch
    import trl
    from transformers import AutoTokenizer, GenerationConfig, TrainerCallback

    from bench.trl_step import grpo_trainer
    from marl_llm.models import _ensure_rope_theta, resolve_model

    out_dir = Path(out)
    out_dir.mkdir(parents=True, exist_ok=True)
    records: list[dict[str, Any]] = []
    pending: dict[str, Any] = {}
    clock: dict[str, float] = {}

    def on_reward(batch_tasks, texts, rewards):
        i = len(records)
        pending["reward/mean"] = statistics.fmean(r.total for r in rewards)
        for name in rewards[0].components:
            pending[f"reward/{name}"] = statistics.fmean(r.components.get(name, 0.0) for r in rewards)
        pending["n_samples"] = len(rewards)
        pending["tasks_match"] = _unique([t["id"] for t in batch_tasks]) == [t["id"] for t in tasks[i]]

    def on_batch(output, seconds):
        i = len(records)
        pending["time/generate"] = round(seconds, 4)
        pending["tokens/completion_mean"] = float(output["completion_mask"].sum()) / len(output["completion_mask"])
        ids = [row[mask.bool()].tolist() for row, mask in zip(output["prompt_ids"], output["prompt_mask"])]
        marl = prompts[i] if i < len(prompts) else []
        pending["prompts_match"] = None if any(p is None for p in marl) else _unique(ids) == marl

    class Clock(TrainerCallback):
        def on_train_begin(self, *a, **k):
            clock["train_begin"] = time.perf_counter()

        def on_step_begin(self, *a, **k):
            clock["step_begin"] = time.perf_counter()

        def on_step_end(self, args, state, control, **k):
            now = time.perf_counter()
            records.append({"step": state.global_step, **pending, "time/step": round(now - clock["step_begin"], 4),
                            "wall_s": round(now - clock["train_begin"], 3),
                            "load1": os.getloadavg()[0]})  # > threads: something else ran during the step
            pending.clear()

        def on_log(self, args, state, control, logs=None, **k):  # TRL's own numbers, for cross-checking
            if records and logs:
                records[-1].update({f"trl/{key}": v for key, v in logs.items() if isinstance(v, (int, float))})
                _write_jsonl(out_dir / STEPS_FILE, records)

    trainer = grpo_trainer(run, tasks, str(out_dir / "trainer"), on_batch=on_batch, on_reward=on_reward,
                           callbacks=[Clock()])
    trainer.train()
    _write_jsonl(out_dir / STEPS_FILE, records)
    # the model as marl_llm saves a policy (learner/worker.py): the trained weights with the base
    # model's tokenizer and generation defaults (TRL set padding and generation settings for
    # training), use_cache on, and rope_theta at the top of config.json (transformers 5 keeps it
    # only in rope_parameters; readers that look for rope_theta would assume 10000, SmolLM2's is 1e5)
    model_path, model_dir = resolve_model(run.model), out_dir / MODEL_DIR
    trainer.model.generation_config = GenerationConfig.from_pretrained(model_path)
    trainer.model.config.use_cache = True
    trainer.model.save_pretrained(model_dir)
    AutoTokenizer.from_pretrained(model_path).save_pretrained(model_dir)
    _ensure_rope_theta(model_dir, trainer.model.config)
    summary = {
        "run": str(Path(run_dir).resolve()), "seed": run.seed, "steps": len(records), "threads": threads,
        "trl": trl.__version__, "torch": torch.__version__, "generation": "model.generate (use_vllm=False)",
        "bf16": bool(trainer.args.bf16), "sampling_temperature": run.rollout.temperature,
        "loss_temperature": trainer.args.temperature, "stop": trainer.stop_strings,
        "setup_s": round(clock["train_begin"] - STARTED, 3), "train_s": records[-1]["wall_s"],
        "tasks_match": all(r.get("tasks_match") for r in records),
        "prompts_match": all(r.get("prompts_match") is not False for r in records),
        "model": str(model_dir.resolve()),
        "max_rss_gb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20, 2),
        "max_load1": max(r["load1"] for r in records),
    }
    (out_dir / SUMMARY_FILE).write_text(json.dumps(summary, indent=2))
    return summary


def _write_jsonl(path: Path, rows: Sequence[dict]) -> None:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


# ---- held-out evaluation -----------------------------------------------------------------------
def eval_command(out: str | os.PathLike, model_dir: str | os.PathLike) -> list[str]:
    """marl_llm's evaluator on DIR (the run's config.yaml, no checkpoint) scoring `model_dir`."""
    out = Path(out).resolve()
    return [sys.executable, "-m", "marl_llm.evaluate", f"run_dir={out}", f"out={out / EVAL_FILE}",
            "model.source=hf", f"model.path={Path(model_dir).resolve()}", "algo.eval_baselines=[]"]


def score(run_dir: str, out: str, model_dir: str) -> dict:
    """Score `model_dir` on the run's held-out test split with `python -m marl_llm.evaluate`
    (eval_command); the result, the run's own numbers and whether the tasks are the run's."""
    from omegaconf import OmegaConf

    from marl_llm.eval_store import load_outcomes
    from marl_llm.stats import read_intervals
    out_dir = Path(out).resolve()
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = OmegaConf.load(Path(run_dir, "config.yaml"))
    cfg.trainer.output_dir = str(out_dir)
    (out_dir / "config.yaml").write_text(OmegaConf.to_yaml(cfg))
    cmd = eval_command(out_dir, model_dir)
    shown = "python " + " ".join(cmd[1:])
    print(f"$ {shown}", flush=True)
    subprocess.run(cmd, check=True)
    result = json.loads((out_dir / EVAL_FILE).read_text())
    ids, _ = load_outcomes(out_dir / Path(EVAL_FILE).stem)
    run_ids, _ = load_outcomes(run_dir)
    held = {"command": shown, "tasks_match": ids == run_ids, "n": result.get("n"),
            **{reading: str(iv) for reading, (key, _) in READINGS.items()
               if (iv := read_intervals(result).get(key)) is not None},
            "run": {reading: str(iv) for reading, (key, _) in READINGS.items()
                    if (iv := marl_curve(run_dir)["test"].get(key)) is not None}}
    print(json.dumps(held, indent=2))
    return held


# ---- report ------------------------------------------------------------------------------------
def marl_curve(run_dir: str | os.PathLike) -> dict[str, Any]:
    """A marl_llm run's per-step reward, strict `correct` reward component, mean reply tokens and
    cumulative training seconds (each step's time/step without its test/dev evaluation and checkpoint save),
    its setup seconds (process start to the first step), and its final test intervals."""
    from marl_llm.stats import read_intervals
    recs = {}
    for line in Path(run_dir, "metrics.jsonl").read_text().splitlines():
        r = json.loads(line)
        recs[r["step"]] = r  # a resumed run re-logs a step: the last one counts
    recs = [recs[k] for k in sorted(recs)]
    wall, total = [], 0.0
    for r in recs:
        total += r["time/step"] - sum(r.get(k, 0.0) for k in EXCLUDED_PHASES)
        wall.append(total)
    last = recs[-1]
    return {"seed": None, "steps": [r["step"] for r in recs], "reward": [r["reward/mean"] for r in recs],
            "correct": [r.get("reward/correct", math.nan) for r in recs], "wall": wall,
            "tokens": [r.get("tokens/completion_mean", math.nan) for r in recs],
            "setup_s": recs[0]["time/wall"] - recs[0]["time/step"], "train_s": wall[-1],
            "test": read_intervals(last, "test/")}


def trl_curve(out: str | os.PathLike) -> dict[str, Any]:
    """The same for a bench.trl_parity output folder."""
    from marl_llm.stats import read_intervals
    recs = [json.loads(l) for l in Path(out, STEPS_FILE).read_text().splitlines()]
    summary = json.loads(Path(out, SUMMARY_FILE).read_text())
    ev = Path(out, EVAL_FILE)
    return {"seed": summary["seed"], "steps": [r["step"] for r in recs], "reward": [r["reward/mean"] for r in recs],
            "correct": [r.get("reward/correct", math.nan) for r in recs], "wall": [r["wall_s"] for r in recs],
            "tokens": [r.get("tokens/completion_mean", math.nan) for r in recs],
            "setup_s": summary["setup_s"], "train_s": recs[-1]["wall_s"],
            "test": read_intervals(json.loads(ev.read_text())) if ev.exists() else {},
            "checks": {k: summary.get(k) for k in ("tasks_match", "prompts_match", "max_load1", "max_rss_gb")}}


def band(curves: Sequence[Sequence[float]]) -> tuple[list[float], list[float]]:
    """Per-step mean and sd (n-1; 0 for one curve) across seeds, over the steps all curves have."""
    n = min(len(c) for c in curves)
    cols = [[c[i] for c in curves] for i in range(n)]
    return ([statistics.fmean(col) for col in cols],
            [statistics.stdev(col) if len(col) > 1 else 0.0 for col in cols])


def mean_sd(xs: Sequence[float], digits: int = 3) -> str:
    xs = [x for x in xs if not math.isnan(x)]
    if not xs:
        return "-"
    m = f"{statistics.fmean(xs):.{digits}f}"
    return f"{m} ± {statistics.stdev(xs):.{digits}f}" if len(xs) > 1 else m


def parity(ours: Sequence[dict], theirs: Sequence[dict]) -> dict[str, Any]:
    """Agreement of per-step training reward, seeds paired (ours[i] with theirs[i]):
    - `diff`: per seed, the mean over the steps both ran of ours - TRL's reward; its mean with the
      95% t-interval over the seed pairs (marl_llm.stats.paired_difference; n-1 degrees of
      freedom), and whether that interval contains 0 (`agree`);
    - per step, each implementation's mean +- sd across seeds, and the steps at which the two
      bands overlap; the Pearson correlation of the two per-step mean curves (each step's tasks
      are the same for both, so their difficulty moves both)."""
    from marl_llm.stats import paired_difference
    n = min(len(c["reward"]) for c in [*ours, *theirs])
    a = [statistics.fmean(c["reward"][:n]) for c in ours]
    b = [statistics.fmean(c["reward"][:n]) for c in theirs]
    iv = paired_difference(a, b)
    (ma, sa), (mb, sb) = band([c["reward"][:n] for c in ours]), band([c["reward"][:n] for c in theirs])
    overlap = [abs(x - y) <= s + t for x, y, s, t in zip(ma, mb, sa, sb)]
    # both implementations train on the same tasks at each step: how closely the per-step means move together
    r = statistics.correlation(ma, mb) if n > 2 and statistics.pstdev(ma) and statistics.pstdev(mb) else math.nan
    return {"steps": n, "ours": a, "trl": b, "diff": iv, "agree": iv.low <= 0 <= iv.high if len(a) > 1 else None,
            "band_ours": (ma, sa), "band_trl": (mb, sb), "overlap": overlap, "step_correlation": r}


def at_steps(curve: dict, steps: int) -> dict:
    return {**curve, **{k: curve[k][:steps] for k in ("steps", "reward", "correct", "wall", "tokens")},
            "train_s": curve["wall"][:steps][-1]}


def report(trl_dirs: Sequence[str], marl_dirs: Sequence[str], figure: Optional[str] = None) -> str:
    """The markdown report (module docstring) of the TRL output folders and their marl_llm runs."""
    if len(trl_dirs) != len(marl_dirs):
        raise ValueError(f"{len(trl_dirs)} TRL folders but {len(marl_dirs)} marl_llm runs: give one run per folder")
    theirs = [trl_curve(d) for d in trl_dirs]
    ours = []
    for d, t in zip(marl_dirs, theirs):
        seed = load_run(d).seed
        if seed != t["seed"]:
            raise ValueError(f"{d} is seed {seed} but its TRL folder is seed {t['seed']}: pair them in the same order")
        ours.append({**marl_curve(d), "seed": seed})
    p = parity(ours, theirs)
    n = p["steps"]
    ours, theirs = [at_steps(c, n) for c in ours], [at_steps(c, n) for c in theirs]
    tok = [[statistics.fmean(c["tokens"]) for c in side] for side in (ours, theirs)]
    L = ["| seed | marl_llm mean train reward | TRL mean train reward | marl_llm - TRL | marl_llm mean `correct` | "
         "TRL mean `correct` | reply tokens, marl_llm / TRL | marl_llm train s | TRL train s | steps/s, marl_llm / TRL | "
         "setup s, marl_llm / TRL |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for o, t, a, b, ka, kb in zip(ours, theirs, p["ours"], p["trl"], *tok):
        L.append(f"| {o['seed']} | {a:.3f} | {b:.3f} | {a - b:+.3f} | {statistics.fmean(o['correct']):.4f} | "
                 f"{statistics.fmean(t['correct']):.4f} | {ka:.1f} / {kb:.1f} | {o['train_s']:.0f} | {t['train_s']:.0f} | "
                 f"{t['train_s'] / o['train_s']:.2f}x | {o['setup_s']:.0f} / {t['setup_s']:.0f} |")
    L.append(f"| mean ± sd | {mean_sd(p['ours'])} | {mean_sd(p['trl'])} | {p['diff'].format(3)} | "
             f"{mean_sd([statistics.fmean(o['correct']) for o in ours])} | "
             f"{mean_sd([statistics.fmean(t['correct']) for t in theirs])} | "
             f"{mean_sd(tok[0], 1)} / {mean_sd(tok[1], 1)} | {mean_sd([o['train_s'] for o in ours], 0)} | "
             f"{mean_sd([t['train_s'] for t in theirs], 0)} | "
             f"{mean_sd([t['train_s'] / o['train_s'] for o, t in zip(ours, theirs)], 2)}x | "
             f"{mean_sd([o['setup_s'] for o in ours], 0)} / {mean_sd([t['setup_s'] for t in theirs], 0)} |")
    verdict = ("contains 0: the per-step training reward agrees within seed noise" if p["agree"] else
               "excludes 0: the training rewards differ by more than seed noise" if p["agree"] is False else
               "one seed: no interval")
    L += ["", f"Training reward: per seed, the mean over steps 1-{n} of marl_llm's per-step reward minus TRL's; "
              f"mean over {len(ours)} seed pairs {p['diff'].format(3)} (95% t-interval, {len(ours) - 1} degrees of "
              "freedom), "
              f"which {verdict}. Per step, the two implementations' mean ± sd bands across seeds overlap at "
              f"{sum(p['overlap'])} of {n} steps; their per-step means correlate at r = {p['step_correlation']:.2f} "
              "(each step's tasks are the same for both)."]
    if len(ours) > 1 and not any(math.isnan(x) for side in tok for x in side):
        from marl_llm.stats import paired_difference
        L += ["", f"Reply length: the mean completion tokens per sample over the steps, marl_llm minus TRL, "
                  f"{paired_difference(*tok).format(1)} (95% t-interval over the seed pairs)."]
    L += held_out(marl_dirs, trl_dirs, ours, theirs)
    checks = [f"seed {t['seed']}: " + ", ".join(f"{k}={round(v, 2) if isinstance(v, float) else v}"
                                                for k, v in t["checks"].items()) for t in theirs]
    L += ["", "Checks (TRL trained on the run's tasks of each step with the run's prompt tokens; the highest 1-minute "
              "load average at a step's end, above TRL's threads if something else ran; TRL's peak memory): " +
          "; ".join(checks)]
    if figure:
        plot(ours, theirs, p, figure)
        L += ["", f"Figure: {figure}"]
    return "\n".join(L)


def held_out(marl_dirs: Sequence[str], trl_dirs: Sequence[str], ours: Sequence[dict], theirs: Sequence[dict]) -> list[str]:
    """The held-out table: per seed and reading the untrained model, marl_llm's and TRL's trained
    model (each the run's evaluation: same tasks, greedy), and paired differences over the tasks
    (marl_llm - TRL, each trained model - the untrained one); then over seeds, the mean ± sd and
    the t-interval of the per-seed differences, and the paired differences pooled over every
    (seed, task)."""
    from marl_llm.eval_store import load_outcomes
    from marl_llm.stats import paired_difference

    def diff(x, y) -> str:
        return paired_difference(x, y).format(3) if x and y else "-"
    rows = ["| seed | reading | untrained | marl_llm | TRL | marl_llm - TRL | marl_llm - untrained | TRL - untrained |",
            "|---|---|---|---|---|---|---|---|"]
    per_seed: dict[str, list[tuple[list, list, list]]] = {r: [] for r in READINGS}
    for d, td, o, t in zip(marl_dirs, trl_dirs, ours, theirs):
        if not t["test"]:
            continue
        ids_o, out_o = load_outcomes(d)
        ids_t, out_t = load_outcomes(Path(td, Path(EVAL_FILE).stem))
        pos = {tid: i for i, tid in enumerate(ids_t)}
        common = [(i, pos[tid]) for i, tid in enumerate(ids_o) if tid in pos]
        for reading, (key, base) in READINGS.items():
            a, b = [out_o[key][i] for i, _ in common], [out_t[key][j] for _, j in common]
            u = [out_o[base][i] for i, _ in common] if base in out_o else []
            per_seed[reading].append((a, b, u))
            cells = [o["test"].get(m) for m in (base, key)] + [t["test"].get(key)]
            rows.append(f"| {o['seed']} | {reading} | " + " | ".join(c.format(3) if c else "-" for c in cells) +
                        f" | {diff(a, b)} | {diff(a, u)} | {diff(b, u)} |")
    if not any(per_seed.values()):
        return []
    for reading, runs in per_seed.items():
        ma, mb, mu = ([statistics.fmean(x) if x else math.nan for x in col] for col in zip(*runs))
        known = not any(math.isnan(x) for x in mu)
        rows.append(f"| mean ± sd over seeds | {reading} | {mean_sd(mu)} | {mean_sd(ma)} | {mean_sd(mb)} | "
                    f"{diff(ma, mb)} | {diff(ma, mu) if known else '-'} | {diff(mb, mu) if known else '-'} |")
        a, b, u = ([x for run in col for x in run] for col in zip(*runs))
        rows.append(f"| pooled over (seed, task) | {reading} | {statistics.fmean(u) if u else math.nan:.3f} | "
                    f"{statistics.fmean(a):.3f} | {statistics.fmean(b):.3f} | {diff(a, b)} | "
                    f"{diff(a, u) if len(u) == len(a) else '-'} | {diff(b, u) if len(u) == len(b) else '-'} |")
    return ["", "Held-out (the run's test split, greedy; differences paired over the same tasks; over seeds: the "
                "t-interval of the per-seed differences, which carries the training's randomness, the pooled one "
                "does not):", "", *rows]


def plot(ours: Sequence[dict], theirs: Sequence[dict], p: dict, path: str) -> None:
    """Reward per step and per second of training (mean over seeds, band +-1 sd; per second, step
    t's point sits at the seeds' mean seconds to the end of step t)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5), sharey=True)
    n = p["steps"]
    for name, curves, (m, s), colour in (("marl_llm", ours, p["band_ours"], "tab:blue"),
                                         ("TRL GRPOTrainer", theirs, p["band_trl"], "tab:orange")):
        steps = list(range(1, n + 1))
        secs, _ = band([c["wall"] for c in curves])
        for ax, x in ((axes[0], steps), (axes[1], secs)):
            ax.plot(x, m, color=colour, lw=2, marker="o", ms=3, label=f"{name} (mean of {len(curves)} seeds)")
            ax.fill_between(x, [a - b for a, b in zip(m, s)], [a + b for a, b in zip(m, s)], color=colour, alpha=0.2)
            for c in curves:  # each seed, thin
                ax.plot(x if ax is axes[0] else c["wall"], c["reward"], color=colour, lw=0.6, alpha=0.5)
    axes[0].set_xlabel("step")
    axes[1].set_xlabel("training seconds (setup excluded)")
    axes[0].set_ylabel("mean training reward (32 samples per step)")
    axes[0].legend(loc="upper left", fontsize=8)
    for ax in axes:
        ax.grid(alpha=0.3)
    fig.suptitle("GRPO: marl_llm vs TRL's GRPOTrainer, same settings, tasks and reward (band: ±1 sd across seeds)")
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)


# ---- command line ------------------------------------------------------------------------------
def main(argv: Optional[list[str]] = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run", help="a finished marl_llm GRPO run folder")
    ap.add_argument("--out", help="the output folder of this seed")
    ap.add_argument("--steps", type=int, help="train only the first N steps (a check)")
    ap.add_argument("--threads", type=int, default=2, help="torch threads of TRL (default 2)")
    ap.add_argument("--no-test", action="store_true", help="skip the held-out evaluation")
    ap.add_argument("--score", metavar="MODEL_DIR", help="only score this saved model on the run's test split")
    ap.add_argument("--report", nargs="+", metavar="DIR", help="TRL output folders to report")
    ap.add_argument("--marl", nargs="+", metavar="RUN", help="their marl_llm runs, same order")
    ap.add_argument("--figure", help="write the two-panel PNG here")
    ap.add_argument("--md", help="also write the markdown report here")
    args = ap.parse_args(argv)
    if args.report:
        if not args.marl:
            ap.error("--report needs --marl RUN ... (one marl_llm run per folder, same order)")
        text = report(args.report, args.marl, args.figure)
        print(text)
        if args.md:
            Path(args.md).write_text(text + "\n")
        return
    if not (args.run and args.out):
        ap.error("give --run RUN --out DIR (training, or --score MODEL_DIR), or --report DIR ... --marl RUN ...")
    if args.score:
        score(args.run, args.out, args.score)
        return
    summary = train(args.run, args.out, args.steps, args.threads)
    print(json.dumps(summary, indent=2), flush=True)
    if not args.no_test:
        summary["test"] = score(args.run, args.out, Path(args.out, MODEL_DIR))
        Path(args.out, SUMMARY_FILE).write_text(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
