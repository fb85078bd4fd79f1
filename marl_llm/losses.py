"""Losses the learners train with: policy gradient (optional ratio clipping and KL), SFT and DPO.

Pure torch on per-token log-probs, so they are unit-testable by hand. Every loss is a *sum* over
the local shard divided by a *global* normaliser (sample or token count over all ranks), so that
data-parallel ranks holding unequal shards still compute the same objective as one process.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F

PG_AGGREGATIONS = ("token_sum", "token_sum_norm", "token_mean", "seq_mean_token_mean")
OFF_POLICY_MODES = ("none", "tis", "decoupled")


@dataclass
class LossConfig:
    """Which loss a policy trains with, and its knobs.

    kind: "pg" | "sft" | "dpo".
    PG aggregation over a sample's tokens (`agg`):
      token_sum            sum_t (MAGRPO: advantage times the sequence log-prob)
      token_sum_norm       sum_t / norm_tokens (Dr. GRPO: a constant, not the sample's length)
      seq_mean_token_mean  mean_t, then mean over samples (original GRPO)
      token_mean           mean over all tokens of all samples (DAPO)
    `clip_eps=None` drops the clipped surrogate: the gradient is then exactly A * grad log pi.
    Off-policy correction (`off_policy`, PG only; needs the samples' behaviour log-probs, see
    `pg_loss`): "none" (today's loss), "tis" (truncated importance sampling, weights capped at
    `is_cap`), "decoupled" (decoupled PPO: tokens whose weight exceeds `is_cap` are masked out).
    """

    kind: str = "pg"
    clip_eps: Optional[float] = 0.2
    clip_eps_high: Optional[float] = None
    kl_coef: float = 0.0
    agg: str = "token_sum_norm"
    norm_tokens: Optional[int] = None
    beta: float = 0.1
    off_policy: str = "none"
    is_cap: float = 2.0
    # the rollout's sampling temperature: the engine's behaviour log-probs are of logits / T, so the
    # learner's proximal log-probs for the importance weight are taken at T too
    behavior_temperature: float = 1.0

    def __post_init__(self):
        if self.kind not in ("pg", "sft", "dpo"):
            raise ValueError(f"loss kind {self.kind!r} is not one of ['pg', 'sft', 'dpo']")
        if self.agg not in PG_AGGREGATIONS:
            raise ValueError(f"loss agg {self.agg!r} is not one of {list(PG_AGGREGATIONS)}")
        if self.off_policy not in OFF_POLICY_MODES:
            raise ValueError(f"loss off_policy {self.off_policy!r} is not one of {list(OFF_POLICY_MODES)}")
        cap = self.is_cap
        if isinstance(cap, bool) or not isinstance(cap, (int, float)) or not cap >= 1.0:
            raise ValueError(f"loss is_cap={cap!r}: the importance-weight cap must be a number >= 1 "
                             "(weights of on-policy tokens are 1)")
        # the aggregation only applies to PG: LossConfig(kind="sft") / ("dpo") need no norm_tokens
        if self.kind == "pg" and self.agg == "token_sum_norm" and not self.norm_tokens:
            raise ValueError("agg=token_sum_norm needs norm_tokens (e.g. the max new tokens)")


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """log p(targets) under `logits` ([..., V] -> [...]), computed in float32.

    `logits[..., t, :]` must be the prediction for `targets[..., t]` (already shifted).
    """
    logits = logits.float()
    return logits.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(logits, dim=-1)


def _per_sample(x: Optional[torch.Tensor], like: torch.Tensor, name: str) -> torch.Tensor:
    if x is None:
        return torch.ones(like.shape[0], dtype=like.dtype, device=like.device)
    x = torch.as_tensor(x, dtype=like.dtype, device=like.device)
    if x.shape != like.shape[:1]:
        raise ValueError(f"{name} has shape {tuple(x.shape)}; expected ({like.shape[0]},)")
    return x


def _aggregate(per_token: torch.Tensor, mask: torch.Tensor, weights: torch.Tensor, cfg: LossConfig,
               n_global_samples: int, n_global_tokens: int) -> torch.Tensor:
    """Sum over this shard of the `cfg.agg` aggregation, divided by its global normaliser."""
    masked = per_token * mask
    seq_sum = masked.sum(-1)
    if cfg.agg == "token_sum":
        return (weights * seq_sum).sum() / n_global_samples
    if cfg.agg == "token_sum_norm":
        return (weights * seq_sum).sum() / (float(cfg.norm_tokens) * n_global_samples)
    if cfg.agg == "seq_mean_token_mean":
        lengths = mask.sum(-1).clamp(min=1)
        return (weights * seq_sum / lengths).sum() / n_global_samples
    if cfg.agg == "token_mean":
        return (weights.unsqueeze(-1) * masked).sum() / n_global_tokens
    raise ValueError(f"unknown aggregation {cfg.agg!r}")


def _check_norm(name: str, n) -> None:
    if n is None or n <= 0:
        raise ValueError(f"{name}={n!r}: the global normaliser must be a positive count")


def _behaviour_weights(prox: torch.Tensor, behav_logp: torch.Tensor, mask: torch.Tensor, cfg: LossConfig,
                       n_tok: torch.Tensor, metrics: dict[str, float]) -> torch.Tensor:
    """Detached per-token importance weights exp(prox - behav), truncated ("tis") or masked
    ("decoupled") above `cfg.is_cap`; 0 on padding. Adds is_weight and is_clip_frac to metrics."""
    with torch.no_grad():
        behav = torch.as_tensor(behav_logp, device=prox.device).to(prox.dtype)
        if behav.shape != prox.shape:
            raise ValueError(f"behav_logp has shape {tuple(behav.shape)}; expected {tuple(prox.shape)}")
        # masked positions may hold garbage; keep exp() finite there
        w = torch.exp(torch.where(mask > 0, prox - behav, torch.zeros_like(prox))) * mask
        over = (w > cfg.is_cap) & (mask > 0)
        metrics["is_weight"] = float(w.sum() / n_tok)
        metrics["is_clip_frac"] = float(over.to(prox.dtype).sum() / n_tok)
        if cfg.off_policy == "tis":
            return torch.clamp(w, max=cfg.is_cap)
        if cfg.off_policy == "decoupled":
            return torch.where(over, torch.zeros_like(w), w)
        raise ValueError(f"unknown off_policy {cfg.off_policy!r}")


def pg_loss(logp: torch.Tensor, mask: torch.Tensor, advantages: torch.Tensor,
            old_logp: Optional[torch.Tensor], ref_logp: Optional[torch.Tensor],
            weights: Optional[torch.Tensor], cfg: LossConfig, n_global_samples: int,
            n_global_tokens: int, behav_logp: Optional[torch.Tensor] = None,
            prox_logp: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Policy-gradient loss on per-token log-probs.

    logp, mask, old_logp, ref_logp, behav_logp: [B, T] (padded positions masked out by `mask`);
    advantages, weights: [B] (weights default to 1). old_logp=None means "on-policy": the ratio
    is exp(logp - logp.detach()) = 1 with gradient grad log pi. The per-token loss is
    -surrogate + kl_coef * k3(ref || pi), aggregated per `cfg.agg`, summed over this shard and
    divided by the global normaliser (`n_global_samples` or `n_global_tokens`).

    Off-policy correction (`cfg.off_policy` != "none" and `behav_logp` given): `behav_logp` are
    the log-probs of the policy that *generated* the tokens (the rollout engine's). Three policies
    are involved, as in decoupled PPO: the behaviour policy (behav_logp), the proximal policy
    (`old_logp`, by default logp.detach(): the weights at the start of this optimiser step) and
    the policy being trained (logp). The PPO ratio r = exp(logp - prox) and its clipping are
    unchanged; each token's surrogate is multiplied by the detached importance weight
    w = exp(prox - behav_logp):
      "tis"        truncated importance sampling: w <- min(w, is_cap). verl's TIS; Yao et al.
                   2025, "Your Efficient RL Framework Secretly Brings You Off-Policy RL Training".
      "decoupled"  decoupled PPO objective: tokens with w > is_cap get weight 0 (masked out of
                   the surrogate; the normaliser is unchanged), the others keep w. Hilton et al.
                   2022, "Batch size-invariance for policy optimization" (arXiv 2110.00641), as
                   AReaL does it with `behav_imp_weight_cap` (arXiv 2505.24298).
    `prox_logp` (default: the proximal policy above) is the proximal policy's log-probs in the
    behaviour's terms for w: the rollout engine samples from logits / T, so the learner passes
    its log-probs at T (`LossConfig.behavior_temperature`; verl scales the logits the same way).
    The KL term is not weighted. With behav_logp=None or off_policy="none" the loss and its
    gradients are exactly those without correction.

    Metrics (means over this shard's tokens): pg_loss, kl_loss (additive parts of the loss),
    ratio, clip_frac, clip_low_frac, clip_high_frac, kl, adv; with a correction also is_weight
    (mean w before truncation) and is_clip_frac (share of tokens truncated or masked).
    """
    if cfg.agg == "token_mean":
        _check_norm("n_global_tokens", n_global_tokens)
    else:
        _check_norm("n_global_samples", n_global_samples)
    mask = mask.to(logp.dtype)
    adv = _per_sample(advantages, logp, "advantages").unsqueeze(-1)
    w = _per_sample(weights, logp, "weights")
    old = logp.detach() if old_logp is None else old_logp.to(logp.dtype)
    # masked positions may hold garbage; keep exp() finite there
    log_ratio = torch.where(mask > 0, logp - old, torch.zeros_like(logp))
    ratio = torch.exp(log_ratio)
    surr = ratio * adv
    metrics: dict[str, float] = {}
    n_tok = mask.sum().clamp(min=1)
    if cfg.clip_eps is not None:
        lo = 1.0 - cfg.clip_eps
        hi = 1.0 + (cfg.clip_eps_high if cfg.clip_eps_high is not None else cfg.clip_eps)
        clipped = torch.clamp(ratio, lo, hi) * adv
        surr = torch.minimum(surr, clipped)
        with torch.no_grad():
            # tokens where the clipped branch is active (its gradient is zero)
            low = ((ratio < lo) & (adv < 0)).to(logp.dtype) * mask
            high = ((ratio > hi) & (adv > 0)).to(logp.dtype) * mask
            metrics["clip_low_frac"] = float(low.sum() / n_tok)
            metrics["clip_high_frac"] = float(high.sum() / n_tok)
            metrics["clip_frac"] = metrics["clip_low_frac"] + metrics["clip_high_frac"]
    if behav_logp is not None and cfg.off_policy != "none":
        prox = old.detach() if prox_logp is None else prox_logp.detach().to(logp.dtype)
        surr = surr * _behaviour_weights(prox, behav_logp, mask, cfg, n_tok, metrics)
    pg = _aggregate(-surr, mask, w, cfg, n_global_samples, n_global_tokens)
    loss = pg
    metrics["pg_loss"] = float(pg.detach())
    if cfg.kl_coef:
        if ref_logp is None:
            raise ValueError("kl_coef > 0 needs reference log-probs (ref_logp)")
        d = torch.where(mask > 0, ref_logp.to(logp.dtype) - logp, torch.zeros_like(logp))
        k3 = torch.exp(d) - d - 1.0
        kl = cfg.kl_coef * _aggregate(k3, mask, w, cfg, n_global_samples, n_global_tokens)
        loss = loss + kl
        metrics["kl_loss"] = float(kl.detach())
        metrics["kl"] = float((k3.detach() * mask).sum() / n_tok)
    with torch.no_grad():
        metrics["ratio"] = float((ratio * mask).sum() / n_tok)
        metrics["adv"] = float(adv.squeeze(-1).mean()) if adv.numel() else 0.0
    metrics["loss"] = float(loss.detach())
    return loss, metrics


def sft_loss(logp: torch.Tensor, mask: torch.Tensor, n_global_tokens: int,
             weights: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, dict[str, float]]:
    """Token-mean negative log-likelihood of the completion tokens: -sum(w * mask * logp) / N_tokens.

    Metrics: loss (additive), nll (mean over this shard's tokens).
    """
    _check_norm("n_global_tokens", n_global_tokens)
    mask = mask.to(logp.dtype)
    w = _per_sample(weights, logp, "weights").unsqueeze(-1)
    masked_logp = torch.where(mask > 0, logp, torch.zeros_like(logp))
    loss = -(w * mask * masked_logp).sum() / n_global_tokens
    n_tok = mask.sum().clamp(min=1)
    return loss, {"loss": float(loss.detach()), "nll": float(-(masked_logp.detach() * mask).sum() / n_tok)}


def dpo_loss(pi_chosen: torch.Tensor, pi_rejected: torch.Tensor, ref_chosen: torch.Tensor,
             ref_rejected: torch.Tensor, beta: float, n_global_pairs: int
             ) -> tuple[torch.Tensor, dict[str, float]]:
    """DPO on sequence log-prob sums ([P] each): sum_p -logsigmoid(beta*((pc-rc)-(pr-rr))) / N_pairs.

    Metrics (means over this shard's pairs): loss (additive), reward_chosen = beta*(pc-rc),
    reward_rejected = beta*(pr-rr), reward_margin (their difference), accuracy (margin > 0).
    """
    _check_norm("n_global_pairs", n_global_pairs)
    ref_chosen = torch.as_tensor(ref_chosen, dtype=pi_chosen.dtype, device=pi_chosen.device)
    ref_rejected = torch.as_tensor(ref_rejected, dtype=pi_chosen.dtype, device=pi_chosen.device)
    r_c = beta * (pi_chosen - ref_chosen)
    r_r = beta * (pi_rejected - ref_rejected)
    margin = r_c - r_r
    loss = -F.logsigmoid(margin).sum() / n_global_pairs
    with torch.no_grad():
        m = {"loss": float(loss.detach())}
        if margin.numel():
            m.update(reward_chosen=float(r_c.mean()), reward_rejected=float(r_r.mean()),
                     reward_margin=float(margin.mean()), accuracy=float((margin > 0).float().mean()))
    return loss, m
