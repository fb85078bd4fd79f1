"""TRL's GRPOTrainer on the same tasks as a marl_llm GRPO run, timed by phase (the `vs_trl`
baseline). Run as a child process, one per thread count:

    python -m bench.trl_step --spec spec.json --threads 2 --out result.json [--vllm]

`spec.json` holds the Hydra overrides of the marl_llm run (the same env, model and settings are
composed here), and the tasks of each step in the order marl_llm trained on them. Every setting
that changes the work or the update is marl_llm's: Dr. GRPO loss (`loss_type=dr_grpo`,
`scale_rewards=none`), clip 0.2, no KL (`beta=0`), on-policy (`num_iterations=1`), constant lr,
AdamW betas/eps/weight decay of `learner.*`, grad clip 1.0, no gradient checkpointing, the same
dtype rule, temperature 1 / top_p 1 / no top-k, and the env's own reward function.

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

os.environ.setdefault("HF_HUB_OFFLINE", "1")
from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()


def compose_run(overrides: list[str]):
    from hydra import compose, initialize_config_dir

    from marl_llm.config import conf_dir, validate
    with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
        return validate(compose(config_name="config", overrides=overrides))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--spec", required=True)
    ap.add_argument("--threads", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--vllm", action="store_true", help="TRL's vLLM generation, colocate mode")
    args = ap.parse_args()
    spec = json.loads(open(args.spec).read())
    runtime.set_threads(args.threads)

    import torch
    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    from envs.base import make_env
    from marl_llm.learner.worker import use_bf16
    from marl_llm.models import resolve_model

    run = compose_run(spec["overrides"])
    env = make_env(run.env, seed=run.seed)
    role = spec["role"]
    steps: list[list[dict]] = spec["steps"]
    G, lc = spec["group_size"], run.learner
    model_path = resolve_model(run.model)
    bf16 = use_bf16(lc.bf16, False, model_path)

    rows = [{"prompt": env.prompt(t, role), "task": json.dumps(t)} for tasks in steps for t in tasks]

    def reward(prompts, completions, task, **_):
        return [env.reward(json.loads(t), {role: c[-1]["content"] if isinstance(c, list) else c}).total
                for c, t in zip(completions, task)]

    times: dict[str, list[float]] = {"generate": [], "step": [], "sync": []}
    tokens: list[int] = []

    class Timed(GRPOTrainer):
        def _generate_and_score_completions(self, inputs):
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            times["generate"].append(time.perf_counter() - t0)
            tokens.append(int(out["completion_mask"].sum()))
            return out

    class StepTimer(TrainerCallback):
        def on_step_begin(self, *a, **k):
            self.t0 = time.perf_counter()

        def on_step_end(self, *a, **k):
            times["step"].append(time.perf_counter() - self.t0)

    error = None
    vllm = dict(use_vllm=True, vllm_mode="colocate", vllm_max_model_length=run.model.max_model_len,
                vllm_importance_sampling_correction=False) if args.vllm else dict(use_vllm=False)
    with tempfile.TemporaryDirectory() as tmp:
        try:
            cfg = GRPOConfig(
                output_dir=tmp, use_cpu=True, bf16=bf16, fp16=False, seed=run.seed, report_to=[],
                save_strategy="no", logging_steps=1, disable_tqdm=True, max_steps=len(steps),
                per_device_train_batch_size=len(steps[0]) * G, gradient_accumulation_steps=1,
                num_generations=G, max_completion_length=run.rollout.max_new_tokens,
                temperature=run.rollout.temperature, top_p=run.rollout.top_p, top_k=0,
                learning_rate=lc.lr, adam_beta1=lc.betas[0], adam_beta2=lc.betas[1], adam_epsilon=1e-8,
                weight_decay=lc.weight_decay, lr_scheduler_type="constant", warmup_steps=0,
                max_grad_norm=lc.grad_clip, loss_type="dr_grpo", scale_rewards="none",
                epsilon=spec["clip_eps"], beta=0.0, num_iterations=1, gradient_checkpointing=False,
                shuffle_dataset=False, dataloader_num_workers=0, **vllm,
                model_init_kwargs={"dtype": torch.bfloat16 if bf16 else torch.float32},
            )
            trainer = Timed(model=model_path, reward_funcs=reward, args=cfg,
                            train_dataset=Dataset.from_list(rows), callbacks=[StepTimer()])
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
