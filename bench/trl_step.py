"""TRL's GRPOTrainer on the same tasks as a marl_llm GRPO run, timed by phase (the `vs_trl`
baseline). Run as a child process, one per thread count:

    python -m bench.trl_step --spec spec.json --threads 2 --out result.json [--vllm]

`spec.json` holds the Hydra overrides of the marl_llm run (the same env, model and settings are
composed here), and the tasks of each step in the order marl_llm trained on them. Every setting
that changes the work or the update is marl_llm's (`grpo_trainer`, shared with bench/trl_parity.py):
Dr. GRPO loss (`loss_type=dr_grpo`, `scale_rewards=none`), the clip, no KL (`beta=0`), on-policy
(`num_iterations=1`), constant lr, AdamW betas/eps/weight decay of `learner.*`, grad clip, no
gradient checkpointing, the same dtype rule, the rollout's temperature / top_p / no top-k, replies
ending at the env's stop strings, the log-probs of the loss taken from the model's own logits
(temperature 1, as marl_llm's learner; TRL would divide them by the sampling temperature), and the
env's own reward function.

`--vllm`: TRL's vLLM generation in colocate mode (`use_vllm=True, vllm_mode="colocate"`: an
in-process `vllm.LLM` whose weights TRL pushes before each generation) instead of
`model.generate`, with the engine context of marl_llm's (`vllm_max_model_length`) and without
TRL's importance-sampling correction of the vLLM log-probs (marl_llm trains on-policy with none,
and without it TRL also skips the extra forward pass that computes the old log-probs). A failure
is not raised: `result.json` gets `error`, the exception's first line (the bench prints it as a row).
"""
from __future__ import annotations

import argparse
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()

ROLE = "single"  # GRPO's one role (algorithms/grpo.py)


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from marl_llm.config import conf_dir, validate
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return validate(compose(config_name="config", overrides=overrides))


def first_episodes_by_step(run_dir: str | os.PathLike) -> list[list[dict]]:
    """Each step's groups in the order marl_llm sampled them, one episode per group (its first
    sample), from the run's buffer.jsonl."""
    steps: dict[int, dict[str, dict]] = {}
    for line in Path(run_dir, "buffer.jsonl").read_text().splitlines():
        ep = json.loads(line)
        steps.setdefault(ep["step"], {}).setdefault(ep["group"], ep)
    return [list(steps[k].values()) for k in sorted(steps)]


def tasks_by_step(run_dir: str | os.PathLike) -> list[list[dict]]:
    """Each step's tasks in the order marl_llm sampled them (one per group), from buffer.jsonl."""
    return [[ep["task"] for ep in eps] for eps in first_episodes_by_step(run_dir)]


def trl_loss_settings(run) -> dict[str, Any]:
    """The GRPOConfig keys of marl_llm's GRPO update; a setting TRL's trainer has no counterpart
    for here stops with ValueError rather than running something else."""
    a = run.algo
    if a.name != "grpo":
        raise ValueError(f"only algo=grpo maps onto TRL's GRPOTrainer (got algo={a.name})")
    if a.loss_agg != "token_sum_norm" or a.std_normalize or a.kl_coef:
        raise ValueError("TRL's Dr. GRPO mapping needs algo.loss_agg=token_sum_norm, algo.std_normalize=false, "
                         f"algo.kl_coef=0 (got {a.loss_agg}, {a.std_normalize}, {a.kl_coef})")
    if run.trainer.max_staleness:
        raise ValueError("TRL's mapping is on-policy: trainer.max_staleness must be 0")
    return dict(loss_type="dr_grpo", scale_rewards="none", epsilon=a.clip_eps, beta=0.0, num_iterations=1)


def grpo_trainer(run, steps: Sequence[Sequence[dict]], output_dir: str, *, vllm: bool = False,
                 on_batch: Optional[Callable[[dict, float], None]] = None,
                 on_reward: Optional[Callable[[list[dict], list[str], list], None]] = None,
                 callbacks: Sequence = ()):
    """TRL's GRPOTrainer set up as marl_llm's GRPO run `run` (a validated RunConfig) on `steps`,
    each step's tasks in marl_llm's order (one group of G samples per task, one optimiser step per
    step). Hooks: `on_batch(output, seconds)` after each generation + scoring (TRL's
    `_generate_and_score_completions`: its output dict and duration), `on_reward(tasks, texts,
    rewards)` with the env's `Reward`s (total and components) of every scored sample."""
    import torch
    from datasets import Dataset
    from transformers import StoppingCriteriaList
    from trl import GRPOConfig, GRPOTrainer

    from envs.base import make_env
    from marl_llm.learner.worker import use_bf16
    from marl_llm.models import resolve_model
    from marl_llm.rollout.hf_backend import StopOnText

    env = make_env(run.env, seed=run.seed)
    G, lc, ro = run.algo.group_size, run.learner, run.rollout
    model_path = resolve_model(run.model)
    bf16 = use_bf16(lc.bf16, False, run.model.dtype)
    stops = env.stop(ROLE)
    rows = [{"prompt": env.prompt(t, ROLE), "task": json.dumps(t)} for tasks in steps for t in tasks]

    def reward(prompts, completions, task, **_):
        tasks = [json.loads(t) for t in task]
        texts = [c[-1]["content"] if isinstance(c, list) else c for c in completions]
        rewards = [env.reward(t, {ROLE: x}) for t, x in zip(tasks, texts)]
        if on_reward is not None:
            on_reward(tasks, texts, rewards)
        return [r.total for r in rewards]

    class Hooked(GRPOTrainer):
        stop_strings = stops  # the env's stop strings, for the caller's summary

        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            if on_batch is not None:
                on_batch(out, time.perf_counter() - t0)
            return out

    # marl_llm samples at rollout.temperature and trains on the model's own log-probs (temperature
    # 1); TRL's `temperature` sets both, so the sampling temperature goes in generation_kwargs
    sampling = {"temperature": ro.temperature}
    if vllm:
        stop = {"stop": stops, "include_stop_str_in_output": True} if stops else {}
        gen = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=run.model.max_model_len,
                   vllm_importance_sampling_correction=False, generation_kwargs={**sampling, **stop})
    else:
        gen = dict(use_vllm=False, generation_kwargs=sampling)
    cfg = GRPOConfig(
        output_dir=output_dir, use_cpu=True, bf16=bf16, fp16=False, seed=run.seed, report_to=[],
        save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=len(steps),
        per_device_train_batch_size=len(steps[0]) * G, gradient_accumulation_steps=1,
        num_generations=G, max_completion_length=ro.max_new_tokens,
        temperature=1.0, top_p=ro.top_p, top_k=0,
        learning_rate=lc.lr, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1], adam_epsilon=1e-8,
        weight_decay=lc.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
        max_grad_norm=lc.grad_clip, gradient_checkpointing=False, **trl_loss_settings(run),
        shuffle_dataset=False, dataloader_num_workers=0, **gen,
        model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
    )
    trainer = Hooked(model=model_path, reward_funcs=reward, args=cfg, train_dataset=Dataset.from_list(rows),
                     callbacks=list(callbacks))
    if stops and not vllm:  # replies end at the env's stop strings, as marl_llm's rollout (vLLM's semantics)
        generate, tok = trainer.model.generate, trainer.processing_class

        def generate_with_stops(*args, **kw):
            kw["stopping_criteria"] = StoppingCriteriaList([StopOnText(tok, stops, kw["input_ids"].shape[1])])
            return generate(*args, **kw)
        trainer.model.generate = generate_with_stops
    return trainer


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vllm", action="store_true", help="TRL's vLLM generation, colocate mode")
    args = ap.parse_args()
    spec = json.loads(open(args.spec).read())
    runtime.set_threads(args.threads)

    from transformers import TrainerCallback

    from marl_llm.learner.worker import use_bf16

    run = compose_run(spec["overrides"])
    times: dict[str, list[float]] = {"generate": [], "step": [], "sync": []}
    tokens: list[int] = []

    def on_batch(out, seconds):
        times["generate"].append(seconds)
        tokens.append(int(out["completion_mask"].sum()))

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["step"].append(time.perf_counter() - self.t0)

    error = None
    with tempfile.TemporaryDirectory() as tmp:
        try:
            trainer = grpo_trainer(run, spec["steps"], tmp, vllm=args.vllm, on_batch=on_batch,
                                   callbacks=[StepTimer()])
            if args.vllm:  # the weight push runs inside each generation: timed on its own
                push = trainer.vllm_generation.sync_weights

                def timed_push():
                    t0 = time.perf_counter()
                    push()
                    times["sync"].append(time.perf_counter() - t0)
                trainer.vllm_generation.sync_weights = timed_push
            trainer.train()
        except Exception as e:  # noqa: BLE001 — reported by the bench as a row, not raised
            if not args.vllm:
                raise
            error = first_line(e)
    bf16 = use_bf16(run.learner.bf16, False, run.model.dtype)
    json.dump({"threads": args.threads, "vllm": args.vllm, "generate": times["generate"], "step": times["step"],
               "sync": times["sync"], "tokens": tokens, "bf16": bf16, "error": error}, open(args.out, "w"))


def first_line(e: BaseException) -> str:
    """`Type: first line of the message`, and the TRL function it came out of."""
    import traceback

    msg = str(e).strip().splitlines()
    where = [f for f in traceback.extract_tb(e.__traceback__) if f"{os.sep}trl{os.sep}" in f.filename]
    return ((f"{type(e).__name__}: {msg[0]}" if msg else type(e).__name__) +
            (f" (in TRL's {where[-1].name})" if where else ""))


if __name__ == "__main__":
    main()
