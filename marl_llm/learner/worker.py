"""LearnerWorker: one rank of a DeepSpeed data-parallel (ZeRO-3 by default) learner group.

A plain class; `LearnerGroup` wraps it with `ray.remote`, one actor per rank. Every public method
that touches weights is a collective: all ranks of the group must call it (the group does).

Objective bookkeeping: every loss is a sum over this rank's shard divided by a *global* count
(samples, tokens or pairs over all ranks). DeepSpeed averages gradients over ranks, so each rank
backpropagates `world_size * loss`: the reduced gradient is then exactly the gradient of the
one global objective, whatever the shard sizes. One `train_step` is one optimiser step: the
shard is cut into `n_micro` micro-batches (equal on all ranks; short shards run empty
micro-batches that contribute zero loss so ZeRO-3's collectives still line up), the
accumulation boundary is set by hand on the last one, and the engine is configured with
gradient_accumulation_steps=1 and `backward(..., scale_wrt_gas=False)` so nothing rescales the
loss behind our back.
"""
from __future__ import annotations

import logging
import os
import time
import warnings
from datetime import timedelta
from pathlib import Path
from typing import Any, Optional, Sequence

from marl_llm import runtime
from marl_llm.config import LearnerConfig, ModelConfig
from marl_llm.deadlines import collective_seconds
from marl_llm.models import _ensure_rope_theta
from marl_llm.losses import LossConfig, dpo_loss, pg_loss, sft_loss, token_logprobs
from marl_llm.types import PairSample, Sample
from marl_llm.weight_sync import meta_of

log = logging.getLogger(__name__)

_DTYPES = {"float32": "float32", "bfloat16": "bfloat16", "float16": "float16"}


def _torch_dtype(name: str):
    import torch
    return getattr(torch, _DTYPES[name])


def use_bf16(flag, on_gpu: bool, engine_dtype: str = "float32") -> bool:
    """LearnerConfig.bf16. "auto": bf16 mixed precision on GPUs; on CPUs the learner computes in
    the dtype the rollout engine samples in (`model.dtype`), i.e. bf16 only with a bfloat16 engine.
    Why: a bf16 learner beside an fp32 engine trains a rounded copy of the policy that sampled and
    pushes bf16-rounded weights back, and choosing bf16 by processor (it is only faster on CPUs with
    native bf16) made the same command train a different model on those CPUs than on the others
    (docs/RESULTS.md). In the engine's dtype a run's numbers are the same on every CPU kind measured,
    at ~1.7x the training time on a native-bf16 CPU. `learner.bf16=true` opts in."""
    if flag == "auto":
        return on_gpu or engine_dtype == "bfloat16"
    return flag is True or str(flag).lower() == "true"


def warmup_scheduler(steps: int):
    """`learner.warmup_steps`: optimiser step k (1-based) runs at lr * min(1, k / steps), then the
    constant lr; None (DeepSpeed's constant lr) when steps is 0. Unlike DeepSpeed's WarmupLR (lr 0
    for the first two steps, and a division by zero for one warm-up step), no step is wasted: a
    short CPU run has few. The engine saves and restores its position with the checkpoint."""
    if steps <= 0:
        return None

    def build(optimizer):
        import torch
        return torch.optim.lr_scheduler.LambdaLR(optimizer, lambda done: min(1.0, (done + 1) / steps))
    return build


def pack(seqs: Sequence[tuple[Sequence[int], Sequence[int]]], pad_id: int):
    """Right-padded (prompt + completion) batch and the positions that score the completions.

    Returns input_ids [B, L], attention_mask [B, L], `start` and, in the coordinates of
    positions start..L-2 (the logits that predict tokens start+1..L-1), targets [B, T] and
    loss_mask [B, T] (1 on completion tokens), plus each row's first completion column.
    Logits before `start` (shared prompt prefixes) never need to be computed.
    """
    import torch

    lens = [len(p) + len(c) for p, c in seqs]
    L = max(lens)
    start = min(len(p) for p, _ in seqs) - 1
    if start < 0:
        raise ValueError("every sample needs at least one prompt token (e.g. BOS)")
    ids = torch.full((len(seqs), L), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), L), dtype=torch.long)
    mask = torch.zeros((len(seqs), L - 1 - start), dtype=torch.float32)
    cols = []
    for b, (p, c) in enumerate(seqs):
        ids[b, : len(p) + len(c)] = torch.tensor(list(p) + list(c), dtype=torch.long)
        attn[b, : len(p) + len(c)] = 1
        col = len(p) - 1 - start
        mask[b, col: col + len(c)] = 1.0
        cols.append(col)
    targets = ids[:, start + 1:]
    return ids, attn, start, targets, mask, cols


def scatter_tokens(values: Sequence[Sequence[float]], cols: Sequence[int], shape) -> "Any":
    """Per-completion-token lists placed into the [B, T] layout of `forward_logp` / `pack`: row
    b's values start at column cols[b]; zeros elsewhere (padding, which the loss masks out)."""
    import torch

    out = torch.zeros(tuple(shape), dtype=torch.float32)
    for b, (v, col) in enumerate(zip(values, cols)):
        if col < 0 or col + len(v) > out.shape[1]:
            raise ValueError(f"row {b}: {len(v)} values at column {col} do not fit in {out.shape[1]} columns")
        out[b, col: col + len(v)] = torch.tensor(list(v), dtype=torch.float32)
    return out


def prompt_groups(prompts: Sequence[Sequence[int]]) -> tuple[list[Sequence[int]], list[int]]:
    """Distinct prompts in order of first appearance, and each input's index into them."""
    index: dict[tuple, int] = {}
    distinct, owner = [], []
    for p in prompts:
        key = tuple(p)
        if key not in index:
            index[key] = len(distinct)
            distinct.append(p)
        owner.append(index[key])
    return distinct, owner


def forward_tokens(samples: Sequence) -> int:
    """Tokens one forward of these samples runs: each distinct prompt once, every completion."""
    prompts = {tuple(s.prompt_ids) for s in samples}
    completions = sum(len(s.chosen_ids) + len(s.rejected_ids) if isinstance(s, PairSample) else len(s.completion_ids)
                      for s in samples)
    return sum(len(p) for p in prompts) + completions


def micro_batches(samples: Sequence, size: int, max_tokens: int = 0) -> list[list[int]]:
    """Cut a shard into micro-batches (lists of indices) of at most `size` samples and, with
    `max_tokens`, at most that many tokens (a distinct prompt counted once): activation memory
    follows tokens, so long prompts get smaller micro-batches. Samples that share a prompt (a
    GRPO group, a DPO pair's prompt) stay together so the prompt runs once per micro-batch;
    groups are filled in order of first appearance, a group over either limit is split (a
    micro-batch always holds at least one sample)."""
    _, owner = prompt_groups([s.prompt_ids for s in samples])
    groups: dict[int, list[int]] = {}
    for i, o in enumerate(owner):
        groups.setdefault(o, []).append(i)

    def fits(idx: list[int]) -> bool:
        return len(idx) <= size and (not max_tokens or forward_tokens([samples[i] for i in idx]) <= max_tokens)

    out: list[list[int]] = []
    for g in groups.values():
        parts, cur = [], []
        for i in g:
            if cur and not fits(cur + [i]):
                parts.append(cur)
                cur = []
            cur.append(i)
        parts.append(cur)
        for part in parts:
            if out and fits(out[-1] + part):
                out[-1].extend(part)
            else:
                out.append(part)
    return out


def shares_prompts(seqs, mode: str = "auto") -> bool:
    """Whether `forward_logp` runs the prompts once: "auto" when some prompt repeats."""
    if mode == "false":
        return False
    return mode == "true" or len({tuple(p) for p, _ in seqs}) < len(seqs)


def forward_logp(module, seqs, pad_id: int, device, grad: bool, share: str = "auto",
                 temperature: Optional[float] = None):
    """Per-token log-probs (fp32) of the completions of (prompt_ids, completion_ids) pairs under
    an HF causal LM (or a DeepSpeed engine around one): (logp [B, T], mask [B, T], cols), row b's
    completion starting at column cols[b]. With repeated prompts (`shares_prompts`) each distinct
    prompt runs through the model once and the completions run on its KV cache: the same
    function, (G-1)/G fewer prompt FLOPs for G samples per prompt. With `temperature`, a fourth
    value: the detached log-probs of the logits divided by it (the distribution a rollout engine
    sampled from at that temperature), from the same forward."""
    if shares_prompts(seqs, share) and max(len(c) for _, c in seqs) > 0:
        return _logp_shared(module, seqs, pad_id, device, grad, temperature)
    return _logp_flat(module, seqs, pad_id, device, grad, temperature)


def _with_scaled(out: tuple, logits_targets: list, temperature: Optional[float]) -> tuple:
    """`out`, plus the log-probs at `temperature` of (logits, targets) parts, concatenated."""
    import torch

    if temperature is None:
        return out
    with torch.no_grad():
        scaled = torch.cat([token_logprobs(lg.detach() / temperature, t) for lg, t in logits_targets], dim=1)
    return (*out, scaled)


def _logp_flat(module, seqs, pad_id: int, device, grad: bool, temperature: Optional[float] = None):
    """One right-padded batch of prompt + completion per sample (layout of `pack`)."""
    import torch

    ids, attn, start, targets, mask, cols = pack(seqs, pad_id)
    ids, attn, targets = ids.to(device), attn.to(device), targets.to(device)
    with torch.enable_grad() if grad else torch.no_grad():
        out = module(input_ids=ids, attention_mask=attn, use_cache=False, logits_to_keep=ids.shape[1] - start)
        logp = token_logprobs(out.logits[:, :-1], targets)
    return _with_scaled((logp, mask.to(device), cols), [(out.logits[:, :-1], targets)], temperature)


def _logp_shared(module, seqs, pad_id: int, device, grad: bool, temperature: Optional[float] = None):
    """Distinct prompts (right-padded) in one forward that keeps its KV cache; the cache rows are
    repeated per sample (gradients flow back through the gather) and the completions run on it
    with explicit positions. Layout: column j is completion token j (cols all 0)."""
    import torch

    distinct, owner = prompt_groups([p for p, _ in seqs])
    lp = torch.tensor([len(p) for p in distinct], dtype=torch.long)
    Lp, Lc, B, P = int(lp.max()), max(len(c) for _, c in seqs), len(seqs), len(distinct)
    p_ids = torch.full((P, Lp), pad_id, dtype=torch.long)
    p_attn = torch.zeros((P, Lp), dtype=torch.long)
    for i, p in enumerate(distinct):
        p_ids[i, : len(p)] = torch.tensor(list(p), dtype=torch.long)
        p_attn[i, : len(p)] = 1
    c_ids = torch.full((B, Lc), pad_id, dtype=torch.long)
    c_mask = torch.zeros((B, Lc), dtype=torch.float32)
    for b, (_, c) in enumerate(seqs):
        c_ids[b, : len(c)] = torch.tensor(list(c), dtype=torch.long)
        c_mask[b, : len(c)] = 1.0
    own = torch.tensor(owner, dtype=torch.long)
    # logits only at each prompt's last position (it predicts the first completion token)
    keep = sorted(set((lp - 1).tolist()))
    last_col = torch.tensor([keep.index(int(n) - 1) for n in lp], dtype=torch.long)
    p_pos = torch.arange(Lp, dtype=torch.long).expand(P, Lp)
    c_pos = lp[own].unsqueeze(1) + torch.arange(Lc, dtype=torch.long)
    # completion pads come after every scored token: causality keeps them out, no mask needed
    attn = torch.cat([p_attn[own], torch.ones_like(c_ids)], dim=1)
    own, c_ids = own.to(device), c_ids.to(device)
    with torch.enable_grad() if grad else torch.no_grad():
        out = module(input_ids=p_ids.to(device), attention_mask=p_attn.to(device), position_ids=p_pos.to(device),
                     use_cache=True, logits_to_keep=torch.tensor(keep, dtype=torch.long, device=device))
        first = out.logits[torch.arange(P, device=device), last_col.to(device)]  # [P, V]
        cache = out.past_key_values
        cache.batch_select_indices(own)
        out = module(input_ids=c_ids, attention_mask=attn.to(device), position_ids=c_pos.to(device),
                     past_key_values=cache, use_cache=True)
        logp = torch.cat([token_logprobs(first[own], c_ids[:, 0]).unsqueeze(1),
                          token_logprobs(out.logits[:, :-1], c_ids[:, 1:])], dim=1)
    return _with_scaled((logp, c_mask.to(device), [0] * B),
                        [(first[own].unsqueeze(1), c_ids[:, :1]), (out.logits[:, :-1], c_ids[:, 1:])], temperature)


def validate_samples(samples: Sequence, loss_cfg: LossConfig) -> None:
    """Raise on data a train_step cannot use. The group calls this on the driver before
    dispatching: a rank that raised mid-step would leave the others blocked in a collective."""
    want = PairSample if loss_cfg.kind == "dpo" else Sample
    bad = sorted({type(s).__name__ for s in samples if not isinstance(s, want)})
    if bad:
        raise TypeError(f"loss kind {loss_cfg.kind!r} trains on {want.__name__} objects, got {bad}")
    for i, s in enumerate(samples):
        if not s.prompt_ids:
            raise ValueError(f"sample {i} has no prompt tokens (give at least a BOS token)")
    if loss_cfg.kind != "pg":
        return
    has_behav = [s.behavior_logprobs is not None for s in samples]
    if any(has_behav) and not all(has_behav):
        i, j = has_behav.index(False), has_behav.index(True)
        raise ValueError(f"sample {i} has no behavior_logprobs but sample {j} has: give them for all "
                         "samples of a batch or none")
    for i, s in enumerate(samples):
        v = s.behavior_logprobs
        if v is None:
            continue
        if len(v) != len(s.completion_ids):
            raise ValueError(f"sample {i}: behavior_logprobs has {len(v)} entries for "
                             f"{len(s.completion_ids)} completion tokens")
        if any(x != x for x in v):
            raise ValueError(f"sample {i}: behavior_logprobs contains NaN")


class _Metrics:
    """Micro-batch metrics: keys ending in 'loss' add up (they are already global fractions);
    the others are averaged with weights (tokens or pairs)."""

    def __init__(self):
        self.sums: dict[str, float] = {}
        self.weighted: dict[str, float] = {}
        self.weight = 0.0

    def add(self, m: dict[str, float], weight: float) -> None:
        for k, v in m.items():
            if k.endswith("loss"):
                self.sums[k] = self.sums.get(k, 0.0) + v
            elif weight > 0:
                self.weighted[k] = self.weighted.get(k, 0.0) + v * weight
        self.weight += weight

    def result(self) -> dict[str, float]:
        out = dict(self.sums)
        for k, v in self.weighted.items():
            out[k] = v / self.weight if self.weight else 0.0
        out["_weight"] = self.weight
        return out


class LearnerWorker:
    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int, model_path: str,
                 model_cfg: ModelConfig, learner_cfg: LearnerConfig, seed: int, need_reference: bool,
                 policy_name: str):
        runtime.apply_defaults()
        # DeepSpeed 0.19.8 calls collectives torch 2.13 deprecates, once per step and rank: noise
        warnings.filterwarnings("ignore", message=r".*is deprecated\. Please use `torch\.distributed", category=FutureWarning)
        self.rank, self.world_size = rank, world_size
        self.model_path, self.model_cfg, self.cfg = model_path, model_cfg, learner_cfg
        self.policy_name, self.seed = policy_name, seed
        self.lora = model_cfg.lora  # LoRA policy: see marl_llm/learner/lora.py
        self.on_gpu = runtime.has_gpu()
        os.environ.update(MASTER_ADDR=str(master_addr), MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size),
                          # Ray gives each GPU actor one visible device; on CPU the rank is harmless
                          LOCAL_RANK="0" if self.on_gpu else str(rank))
        import torch
        import deepspeed
        import transformers

        # per-rank chatter (DeepSpeed's config dump, load progress bars) floods the driver's log
        deepspeed.utils.logger.setLevel(logging.WARNING)
        transformers.utils.logging.disable_progress_bar()
        if self.on_gpu:
            torch.cuda.set_device(0)
        else:
            torch.set_num_threads(1)
            # the shared-memory allreduce op is JIT-compiled (~1 min) on first init; gloo is enough
            # (deepspeed.ops.__compatible_ops__ is a lazily probed dict in 0.19.8; edits persist)
            ops = deepspeed.ops.__compatible_ops__
            if "deepspeed_shm_comm" in ops:
                ops["deepspeed_shm_comm"] = False
        self.backend = "nccl" if self.on_gpu else "gloo"
        t0 = time.time()
        deepspeed.init_distributed(dist_backend=self.backend, auto_mpi_discovery=False,
                                   timeout=timedelta(seconds=collective_seconds(learner_cfg.timeout_s)))
        torch.manual_seed(seed)
        self.bf16 = use_bf16(learner_cfg.bf16, self.on_gpu, model_cfg.dtype)
        self.out_dtype = _torch_dtype(model_cfg.dtype)
        self.device = torch.device("cuda", 0) if self.on_gpu else torch.device("cpu")

        from transformers import AutoConfig, AutoTokenizer

        self.hf_config = AutoConfig.from_pretrained(model_path)
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(model_path)
        except Exception as e:  # noqa: BLE001 — a weights-only folder still trains; save_hf says so
            log.warning("no tokenizer in %s (%s): save_hf will write weights and config only", model_path, e)
            self.tokenizer = None
        pad = getattr(self.hf_config, "pad_token_id", None)
        if pad is None and self.tokenizer is not None:
            pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.tokenizer.eos_token_id
        self.pad_id = int(pad) if pad is not None else 0

        model = self._load_hf_model()
        self.loaded_partitioned = any(hasattr(p, "ds_id") for p in model.parameters())
        if learner_cfg.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
            if self.lora is not None:  # frozen embeddings: checkpointed blocks need inputs with grads
                model.enable_input_require_grads()
        self.engine, *_ = deepspeed.initialize(model=model, config=self._ds_config(train=True),
                                               model_parameters=[p for p in model.parameters() if p.requires_grad],
                                               lr_scheduler=warmup_scheduler(learner_cfg.warmup_steps))
        self.engine.train()
        self.ref = None
        if need_reference:
            self._build_reference()
        self._sync = None
        self._meta = None
        self.init_seconds = time.time() - t0

    # ---- construction ---------------------------------------------------------------------------
    def _ds_config(self, train: bool) -> dict:
        c = self.cfg
        zero: dict[str, Any] = {"stage": c.zero_stage}
        if train and c.offload_optimizer and c.zero_stage > 0:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": self.on_gpu}
        cfg: dict[str, Any] = {
            "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1,  # accumulation is ours: see the module docstring
            "zero_optimization": zero,
            "bf16": {"enabled": self.bf16},
            "steps_per_print": 2 ** 31 - 1,
            "wall_clock_breakdown": False,
            "zero_allow_untested_optimizer": True,
        }
        if train:
            cfg["gradient_clipping"] = float(c.grad_clip or 0.0)
            # torch's AdamW: no fused_adam / cpu_adam JIT build (minutes on first use)
            cfg["optimizer"] = {"type": "AdamW", "params": {
                "lr": c.lr, "betas": list(c.betas), "eps": 1e-8, "weight_decay": c.weight_decay,
                "torch_adam": True}}
            cfg["zero_force_ds_cpu_optimizer"] = False
        return cfg

    def _load_hf_model(self):
        """The base model (partitioned at load under ZeRO-3), wrapped with a fresh LoRA adapter
        for LoRA policies."""
        model = self._load_base_model()
        if self.lora is None:
            return model
        from marl_llm.learner import lora
        return lora.wrap(model, self.lora)

    def _load_base_model(self):
        import copy

        import torch
        from transformers import AutoModelForCausalLM

        config = copy.deepcopy(self.hf_config)
        # RL needs the same function for sampling-time and training-time log-probs: no dropout
        for k, v in list(vars(config).items()):
            if "dropout" in k and isinstance(v, float):
                setattr(config, k, 0.0)
        config.use_cache = False
        if self.cfg.zero_stage != 3:
            return AutoModelForCausalLM.from_pretrained(self.model_path, config=config, dtype=torch.float32)
        # ZeRO-3: load straight into partitions (deepspeed.zero.Init through transformers'
        # HfDeepSpeedConfig hook) instead of a full copy per rank. The hook is a process-global
        # weak reference: it lives only for this call, so later from_config/from_pretrained
        # calls (save_hf) build ordinary modules.
        from transformers.integrations.deepspeed import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hook = HfDeepSpeedConfig(self._ds_config(train=False))
        try:
            return AutoModelForCausalLM.from_pretrained(self.model_path, config=config, dtype=torch.float32)
        finally:
            unset_hf_deepspeed_config()
            del hook

    def _build_reference(self) -> None:
        """A frozen copy of the initial weights: a ZeRO-3 inference engine (partitioned like the
        policy) under stage 3, a plain module otherwise."""
        import deepspeed

        model = self._load_hf_model()
        model.requires_grad_(False)
        model.eval()
        if self.cfg.zero_stage == 3:
            self.ref, *_ = deepspeed.initialize(model=model, config=self._ds_config(train=False))
        else:
            dtype = _torch_dtype("bfloat16") if self.bf16 else _torch_dtype("float32")
            self.ref = model.to(self.device, dtype=dtype)
        self.ref.eval()

    def _gathered(self, params, modifier_rank=None):
        """Whole parameters for the duration of the block: ZeRO-3 gathers them (and with a
        `modifier_rank`, re-partitions that rank's edits on exit); other stages hold them whole."""
        if self.cfg.zero_stage != 3:
            import contextlib
            return contextlib.nullcontext()
        import deepspeed
        return deepspeed.zero.GatheredParameters(list(params), modifier_rank=modifier_rank)

    def ready(self) -> dict:
        numel = lambda p: getattr(p, "ds_numel", p.numel())  # noqa: E731 - ZeRO-3 shards report 0
        n = sum(numel(p) for p in self.engine.module.parameters())
        trainable = sum(numel(p) for p in self.engine.module.parameters() if p.requires_grad)
        return {"rank": self.rank, "world_size": self.world_size, "backend": self.backend,
                "zero_stage": self.cfg.zero_stage, "bf16": self.bf16, "params": n,
                "trainable_params": trainable, "lora": self.lora is not None,
                "loaded_partitioned": self.loaded_partitioned, "init_seconds": self.init_seconds,
                "pid": os.getpid(), "node": runtime.node_label()}

    # ---- collectives helpers --------------------------------------------------------------------
    def _agree(self, *values: int) -> list[int]:
        """Max of each value over all ranks (micro-batch counts, 'someone needs the reference')."""
        import torch
        import torch.distributed as dist

        t = torch.tensor([int(v) for v in values], dtype=torch.long, device=self.device)
        if self.world_size > 1:
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return [int(x) for x in t.tolist()]

    def _forward_logp(self, module, seqs, grad: bool, temperature: Optional[float] = None):
        """Per-token log-probs (fp32) of the completions in `seqs`: (logp [B, T], mask [B, T], cols)
        where row b's completion starts at column cols[b]."""
        share = self.cfg.share_prompts
        if self.cfg.gradient_checkpointing:  # checkpointed blocks keep no KV cache
            share = "false"
        return forward_logp(module, seqs, self.pad_id, self.device, grad, share, temperature)

    def _dummy_forward(self, module, grad: bool):
        """A forward that keeps ZeRO-3's gathers in step on a rank with nothing left to do."""
        import torch

        ids = torch.full((1, 2), self.pad_id, dtype=torch.long, device=self.device)
        ctx = torch.enable_grad() if grad else torch.no_grad()
        with ctx:
            out = module(input_ids=ids, use_cache=False, logits_to_keep=1)
            return out.logits.float().sum() * 0.0

    def _reference_module(self):
        if self.ref is None:
            log.info("learner %s rank %d: building the reference model on first use", self.policy_name, self.rank)
            self._build_reference()
        return self.ref

    # ---- training -------------------------------------------------------------------------------
    def train_step(self, samples_shard: list, loss_cfg: LossConfig, n_global_samples: int,
                   n_global_tokens: int, n_micro: int) -> dict[str, float]:
        """One optimiser step over this rank's shard (see the module docstring). Returns metrics:
        loss parts (this rank's share of the global objective), weighted means, grad_norm, lr."""
        import torch

        runtime.fault_point("learner.train_step", self.rank)
        t0 = time.time()
        kind = loss_cfg.kind
        validate_samples(samples_shard, loss_cfg)
        local = micro_batches(samples_shard, max(1, self.cfg.micro_batch_size), self.cfg.micro_batch_tokens)
        (n_micro,) = self._agree(max(n_micro, len(local)))
        ref = self._reference_module() if self._needs_reference(loss_cfg) else None
        self.engine.train()
        metrics = _Metrics()
        with runtime.compute_phase(self.cfg.threads) as threads:
            for i in range(n_micro):
                runtime.rebalance()  # another engine may have started or finished computing
                self.engine.set_gradient_accumulation_boundary(i == n_micro - 1)
                batch = [samples_shard[j] for j in local[i]] if i < len(local) else []
                if not batch:
                    if ref is not None:
                        self._dummy_forward(ref, grad=False)
                    loss = self._dummy_forward(self.engine, grad=True)
                elif kind == "dpo":
                    loss, m, w = self._dpo_micro(batch, loss_cfg, ref, n_global_samples)
                    metrics.add(m, w)
                else:
                    loss, m, w = self._pg_micro(batch, loss_cfg, ref, n_global_samples, n_global_tokens)
                    metrics.add(m, w)
                # DeepSpeed averages gradients over ranks: scale so the reduced gradient is the global sum
                self.engine.backward(loss * self.world_size, scale_wrt_gas=False)
            lr = float(self.engine.get_lr()[0])  # the rate this step applies (step() moves a warm-up on)
            self.engine.step()
        self.engine.set_gradient_accumulation_boundary(False)
        out = metrics.result()
        gn = self.engine.get_global_grad_norm()
        out["grad_norm"] = float(gn) if gn is not None else float("nan")
        out["lr"] = lr
        out["global_step"] = int(self.engine.global_steps)
        out["n_micro"] = n_micro
        out["threads"] = threads
        out["time_s"] = time.time() - t0
        if not torch.isfinite(torch.tensor(out.get("loss", 0.0))):
            log.warning("learner %s rank %d: non-finite loss %s", self.policy_name, self.rank, out.get("loss"))
        return out

    @staticmethod
    def _needs_reference(loss_cfg: LossConfig) -> bool:
        """The reference model is scored here, in the step, for DPO and for a KL term: the one
        place reference log-probs come from."""
        return loss_cfg.kind == "dpo" or (loss_cfg.kind == "pg" and bool(loss_cfg.kl_coef))

    def _pg_micro(self, batch: list[Sample], loss_cfg: LossConfig, ref, n_samples: int, n_tokens: int):
        import torch

        seqs = [(s.prompt_ids, s.completion_ids) for s in batch]
        ref_logp = None
        if ref is not None:
            ref_logp, _, _ = self._forward_logp(ref, seqs, grad=False)
        # samples of older weights: weighed by the sampling distribution's (logits / T) ratio
        correct = loss_cfg.off_policy != "none" and batch[0].behavior_logprobs is not None  # all or none
        temperature = loss_cfg.behavior_temperature if correct and loss_cfg.behavior_temperature > 0 else None
        logp, mask, cols, *prox = self._forward_logp(self.engine, seqs, grad=True, temperature=temperature)
        if loss_cfg.kind == "sft":
            w = torch.tensor([s.weight for s in batch], dtype=torch.float32, device=self.device)
            loss, m = sft_loss(logp, mask, n_tokens, w)
            return loss, m, float(mask.sum())
        adv = torch.tensor([s.advantage for s in batch], dtype=torch.float32, device=self.device)
        w = torch.tensor([s.weight for s in batch], dtype=torch.float32, device=self.device)
        behav = scatter_tokens([s.behavior_logprobs for s in batch], cols, logp.shape).to(self.device) if correct else None
        loss, m = pg_loss(logp, mask, adv, None, ref_logp, w, loss_cfg, n_samples, n_tokens, behav_logp=behav,
                          prox_logp=prox[0] if prox else None)
        return loss, m, float(mask.sum())

    def _dpo_micro(self, batch: list[PairSample], loss_cfg: LossConfig, ref, n_pairs: int):
        import torch

        seqs = [(p.prompt_ids, p.chosen_ids) for p in batch] + [(p.prompt_ids, p.rejected_ids) for p in batch]
        P = len(batch)
        rlogp, rmask, _ = self._forward_logp(ref, seqs, grad=False)
        rsum = (rlogp * rmask).sum(-1).float()
        rc, rr = rsum[:P], rsum[P:]
        logp, mask, _ = self._forward_logp(self.engine, seqs, grad=True)
        seq = (logp * mask).sum(-1)
        loss, m = dpo_loss(seq[:P], seq[P:], rc, rr, loss_cfg.beta, n_pairs)
        return loss, m, float(P)

    # ---- scoring --------------------------------------------------------------------------------
    def logprobs(self, samples_shard: list[Sample], reference: bool = False,
                 n_micro: int = 0) -> list[list[float]]:
        """Per completion token log-probs (fp32) under the current (or reference) weights.
        A collective under ZeRO-3: every rank runs the same number of forwards."""
        local = micro_batches(samples_shard, max(1, self.cfg.micro_batch_size), self.cfg.micro_batch_tokens)
        (n,) = self._agree(max(n_micro, len(local)))
        module = self._reference_module() if reference else self.engine
        was_training = self.engine.training
        self.engine.eval()
        out: list[Any] = [None] * len(samples_shard)
        try:
            with runtime.compute_phase(self.cfg.threads):
                for i in range(n):
                    runtime.rebalance()
                    if i >= len(local):
                        self._dummy_forward(module, grad=False)
                        continue
                    batch = [samples_shard[j] for j in local[i]]
                    logp, _, cols = self._forward_logp(module, [(s.prompt_ids, s.completion_ids) for s in batch],
                                                       grad=False)
                    logp = logp.float().cpu()
                    for b, (j, s, col) in enumerate(zip(local[i], batch, cols)):
                        out[j] = logp[b, col: col + len(s.completion_ids)].tolist()
        finally:
            self.engine.train(was_training)
        return out

    # ---- reference ------------------------------------------------------------------------------
    def snapshot_reference(self) -> None:
        """Make the current weights the frozen reference (DPO after SFT). Collective.

        Module by module: under ZeRO-3 both copies are gathered (the reference with
        modifier_rank=0, so the copied values are re-partitioned on exit); small parameters
        that ZeRO-3 keeps whole ("persistent") are handled by the same path."""
        import torch

        if self.ref is None:
            self._build_reference()
        ref_root = self.ref.module if self.cfg.zero_stage == 3 else self.ref
        src_mods = dict(self.engine.module.named_modules())
        with torch.no_grad():
            for name, rmod in ref_root.named_modules():
                rparams = list(rmod.named_parameters(recurse=False))
                if not rparams:
                    continue
                sp = dict(src_mods[name].named_parameters(recurse=False))
                pairs = [(p, sp[n]) for n, p in rparams]
                with self._gathered(q for _, q in pairs), self._gathered((p for p, _ in pairs), modifier_rank=0):
                    for p, q in pairs:
                        p.data.copy_(q.data)

    # ---- weights out ----------------------------------------------------------------------------
    def full_state_dict(self, include_tied: bool = True, buffers: bool = True) -> Optional[dict]:
        """All weights with Hugging Face names, in `model.dtype`, on CPU. Collective; rank 0 gets
        the dict, the others None. Tied weights (lm_head = embed_tokens) appear under both names
        when `include_tied` (a strict `load_state_dict` wants both; safetensors keeps one).
        Gathers one module's parameters at a time (peak memory: the largest layer, not the model).
        Parameters come in `named_parameters()` order, then (if `buffers`) persistent buffers.
        LoRA policies: base names, adapters merged into their layers' weights (learner/lora.py)."""
        import torch

        from marl_llm.learner import lora

        module = self.engine.module
        out: dict[str, torch.Tensor] | None = {} if self.rank == 0 else None
        seen: dict[int, str] = {}

        def visit(mod, prefix: str):
            if self.lora is not None and lora.is_lora_layer(mod):
                with self._gathered(mod.parameters()):
                    if out is not None:
                        out[lora.hf_name(prefix + "weight")] = lora.merged_weight(mod).detach().to(
                            "cpu", dtype=self.out_dtype, copy=True)
                        if getattr(mod.base_layer, "bias", None) is not None:
                            out[lora.hf_name(prefix + "bias")] = mod.base_layer.bias.detach().to(
                                "cpu", dtype=self.out_dtype, copy=True)
                return
            params = list(mod.named_parameters(recurse=False))
            if params:
                with self._gathered(p for _, p in params):
                    if out is not None:
                        for name, p in params:
                            key = lora.hf_name(prefix + name)
                            if id(p) in seen:
                                if include_tied:
                                    out[key] = out[seen[id(p)]]
                                continue
                            seen[id(p)] = key
                            out[key] = p.detach().to("cpu", dtype=self.out_dtype, copy=True)
            if out is not None and buffers:
                for name, b in mod.named_buffers(recurse=False):
                    if name not in mod._non_persistent_buffers_set:
                        out[lora.hf_name(prefix + name)] = b.detach().cpu().clone()
            for name, child in mod.named_children():
                visit(child, prefix + name + ".")

        visit(module, "")
        return out

    def adapter_state_dict(self) -> Optional[dict]:
        """A LoRA policy's adapter tensors under peft's saved names. Collective; rank 0 gets it."""
        from marl_llm.learner import lora

        named = [(n, p) for n, p in self.engine.module.named_parameters() if lora.is_adapter_param(n)]
        with self._gathered(p for _, p in named):
            if self.rank != 0:
                return None
            return {lora.adapter_key(n): p.detach().to("cpu", dtype=self.out_dtype, copy=True) for n, p in named}

    def _model_for_saving(self, state: dict):
        import torch
        from transformers import AutoModelForCausalLM

        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(self.hf_config, dtype=self.out_dtype)
        model.load_state_dict(state, strict=True, assign=True)
        model.tie_weights()
        return model

    def save_hf(self, out_dir: str) -> Optional[str]:
        """A Hugging Face folder (config, safetensors, tokenizer) that `from_pretrained` and vLLM
        load. Collective (the ZeRO-3 gather); rank 0 writes. Written to a temporary folder and
        renamed into place, so a crash never leaves a half-written model."""
        import shutil
        import tempfile

        state = self.full_state_dict(include_tied=True)
        adapter = self.adapter_state_dict() if self.lora is not None else None
        if self.rank != 0:
            return None
        out = Path(out_dir)
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=out.name + ".", dir=out.parent))
        try:
            model = self._model_for_saving(state)
            model.save_pretrained(str(tmp), safe_serialization=True)
            if self.tokenizer is not None:
                self.tokenizer.save_pretrained(str(tmp))
            for name in ("generation_config.json", "chat_template.jinja"):
                src = Path(self.model_path) / name
                if src.is_file() and not (tmp / name).exists():
                    shutil.copy(src, tmp / name)
            _ensure_rope_theta(tmp, self.hf_config)
            if adapter is not None:
                self._save_adapter(adapter, tmp)
            if out.exists():
                shutil.rmtree(out)
            os.rename(tmp, out)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
        return str(out)

    def _save_adapter(self, adapter: dict, folder: Path) -> None:
        from safetensors.torch import save_file

        from marl_llm.learner import lora

        dest = folder / lora.ADAPTER_DIR
        self.engine.module.peft_config["default"].save_pretrained(str(dest))
        save_file({k: v.contiguous() for k, v in adapter.items()}, str(dest / "adapter_model.safetensors"))

    # ---- exact resume ---------------------------------------------------------------------------
    def save_state(self, out_dir: str) -> None:
        """DeepSpeed checkpoint (partitioned weights, optimizer, step counters). Collective."""
        self.engine.save_checkpoint(str(out_dir), tag="state",
                                    client_state={"policy": self.policy_name, "world_size": self.world_size})

    def load_state(self, in_dir: str) -> dict:
        """Restore a `save_state` checkpoint. Collective. With the rank count that wrote it, each
        rank loads its own ZeRO shard. A ZeRO (stage 1-3) checkpoint of another rank count is
        re-sharded exactly through DeepSpeed's universal checkpoint (`_load_resharded`). Stage 0
        keeps whole copies (rank 0 writes the optimizer state once): any rank count loads it."""
        shards = list(Path(in_dir, "state").glob("*zero_pp_rank_*_mp_rank_*optim_states.pt"))
        reshard = self.cfg.zero_stage > 0 and bool(shards) and len(shards) != self.world_size
        if reshard:
            path, client = self._load_resharded(in_dir)
        else:
            path, client = self.engine.load_checkpoint(str(in_dir), tag="state", load_optimizer_states=True,
                                                       load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no learner checkpoint under {in_dir}")
        return {"global_steps": int(self.engine.global_steps), "client_state": client or {},
                "resharded_from": len(shards) if reshard else None}

    def _load_resharded(self, in_dir: str):
        """Rank 0 converts the checkpoint to DeepSpeed's universal format (per parameter name: the
        full fp32 master weights, Adam's exp_avg and exp_avg_sq; the optimizer's step and hyper-
        parameters), every rank then takes its partition of each for this group's rank count.
        The numbers are copied, not recomputed: the resumed run continues exactly. The universal
        copy lives next to the checkpoint (every rank reads it) and is removed afterwards."""
        import argparse
        import contextlib
        import io
        import shutil

        import torch.distributed as dist
        from deepspeed.checkpoint import ds_to_universal

        universal = Path(in_dir, "universal")
        if self.rank == 0:
            shutil.rmtree(universal, ignore_errors=True)  # left by a crash mid-conversion
            # serial (no process pool inside a Ray actor); inject_missing_state: ZeRO-1/2 conversion
            # otherwise wants Megatron's universal_checkpoint_info, which HF models do not carry
            args = argparse.Namespace(input_folder=str(Path(in_dir, "state")), output_folder=str(universal / "state"),
                                      num_extract_workers=1, num_merge_workers=1, keep_temp_folder=False,
                                      strict=True, inject_missing_state=True)
            # its progress prints would flood engines.log; a failure still raises
            with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
                ds_to_universal.main(args)
        dist.barrier()
        # the engine reads this flag only while loading; set at initialize it would route every load here
        self.engine._config.load_universal_checkpoint = True
        try:
            loaded = self.engine.load_checkpoint(str(universal), tag="state", load_optimizer_states=True,
                                                 load_lr_scheduler_states=True)
        finally:
            self.engine._config.load_universal_checkpoint = False
        dist.barrier()
        if self.rank == 0:
            shutil.rmtree(universal, ignore_errors=True)
        return loaded

    def global_steps(self) -> int:
        return int(self.engine.global_steps)

    def optimizer_step_count(self) -> int:
        """AdamW's own step counter (what a resume must restore), read from this rank's state."""
        opt = getattr(self.engine.optimizer, "optimizer", self.engine.optimizer)
        steps = [int(st["step"]) for st in getattr(opt, "state", {}).values() if "step" in st]
        return max(steps) if steps else 0

    # ---- weight sync to rollout workers ---------------------------------------------------------
    def weight_meta(self) -> Any:
        """What receivers need to allocate the pushed tensors (names, shapes, dtypes), without a gather."""
        import torch

        from marl_llm.learner import lora

        if self._meta is None:
            named = [(lora.hf_name(n), torch.empty(tuple(getattr(p, "ds_shape", p.shape)), dtype=self.out_dtype,
                                                   device="meta"))
                     for n, p in self.engine.module.named_parameters() if not lora.is_adapter_param(n)]
            self._meta = meta_of(named)
        return self._meta

    def node_addr_and_free_port(self) -> tuple[str, int]:
        """This rank's node address (as Ray sees it) and a free TCP port there."""
        from marl_llm.weight_sync import node_addr_and_free_port
        return node_addr_and_free_port()

    def init_weight_sync(self, master_addr: str, master_port: int, world_size: int, timeout_s: float) -> bool:
        """Rank 0 joins the sync group as its rank 0 (the broadcaster); other ranks only gather."""
        if self.rank != 0:
            return False
        from marl_llm.weight_sync import WeightSyncGroup

        if self._sync is not None:
            self._sync.close()
        self._sync = WeightSyncGroup(master_addr, master_port, 0, world_size, timeout_s,
                                     backend="nccl" if self.on_gpu else "gloo")
        return True

    def push_weights(self) -> dict:
        """Gather (all ranks) and broadcast from rank 0 to the rollout workers."""
        runtime.fault_point("learner.push_weights", self.rank)
        t0 = time.time()
        # parameters only, tied ones once: exactly the list `weight_meta` describes
        state = self.full_state_dict(include_tied=False, buffers=False)
        t1 = time.time()
        if self.rank != 0:
            return {"gather_s": t1 - t0}
        if self._sync is None:
            raise RuntimeError("push_weights before init_weight_sync")
        named = list(state.items())
        self._sync.broadcast(named)
        return {"gather_s": t1 - t0, "broadcast_s": time.time() - t1,
                "bytes": sum(t.numel() * t.element_size() for _, t in named)}

    def shutdown(self) -> None:
        import torch.distributed as dist

        if self._sync is not None and hasattr(self._sync, "close"):
            try:
                self._sync.close()
            except Exception:  # noqa: BLE001
                pass
        if dist.is_initialized():
            dist.destroy_process_group()
