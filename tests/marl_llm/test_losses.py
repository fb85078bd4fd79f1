"""Hand-computed checks of the learner losses (pure torch, fast)."""
import math

import pytest
import torch

from marl_llm.losses import LossConfig, dpo_loss, pg_loss, sft_loss, token_logprobs

# two samples: lengths 2 and 1 (padding masked out), advantages +2 and -1
LOGP = [[-1.0, -2.0, -9.0], [-0.5, -9.0, -9.0]]
MASK = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
ADV = torch.tensor([2.0, -1.0])


def _logp(values=LOGP):
    return torch.tensor(values, requires_grad=True)


def _pg(agg, n_samples=4, n_tokens=6, norm_tokens=None, **kw):
    cfg = LossConfig(kind="pg", clip_eps=None, agg=agg, norm_tokens=norm_tokens, **kw)
    logp = _logp()
    loss, m = pg_loss(logp, MASK, ADV, None, None, None, cfg, n_samples, n_tokens)
    loss.backward()
    return loss.item(), logp.grad, m


def test_token_sum_is_magrpo_gradient():
    # loss = -(1/N) sum_i A_i sum_t log pi_it  ->  value at ratio 1: -(2*2 - 1*1)/4
    loss, grad, m = _pg("token_sum")
    assert loss == pytest.approx(-0.75)
    # gradient exactly -A_i / N on each completion token, zero on padding
    assert torch.equal(grad, torch.tensor([[-0.5, -0.5, 0.0], [0.25, 0.0, 0.0]]))
    assert m["loss"] == pytest.approx(-0.75) and m["ratio"] == pytest.approx(1.0)


def test_token_sum_norm_divides_by_constant():
    loss, grad, _ = _pg("token_sum_norm", norm_tokens=4)
    assert loss == pytest.approx(-3.0 / 16)
    assert torch.allclose(grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]) / 16)


def test_seq_mean_token_mean():
    # sample 0: mean_t(-2) = -2; sample 1: +1; mean over N=4 samples
    loss, grad, _ = _pg("seq_mean_token_mean")
    assert loss == pytest.approx(-0.25)
    assert torch.allclose(grad, torch.tensor([[-0.25, -0.25, 0.0], [0.25, 0.0, 0.0]]))


def test_token_mean_uses_global_tokens():
    loss, grad, _ = _pg("token_mean", n_tokens=6)
    assert loss == pytest.approx(-3.0 / 6)
    assert torch.allclose(grad, torch.tensor([[-2.0, -2.0, 0.0], [1.0, 0.0, 0.0]]) / 6)


def test_sample_weights():
    cfg = LossConfig(kind="pg", clip_eps=None, agg="token_sum")
    loss, _ = pg_loss(_logp(), MASK, ADV, None, None, torch.tensor([0.5, 3.0]), cfg, 2, 3)
    assert loss.item() == pytest.approx(-(0.5 * 4 - 3.0 * 1) / 2)


@pytest.mark.parametrize("agg", ["token_sum", "token_sum_norm", "token_mean", "seq_mean_token_mean"])
def test_shards_sum_to_the_global_loss(agg):
    """Each rank's loss is its shard's sum over a global normaliser: the shards add up."""
    torch.manual_seed(0)
    logp, old, ref = -torch.rand(5, 4) * 3, -torch.rand(5, 4) * 3, -torch.rand(5, 4) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).float()
    adv = torch.randn(5)
    cfg = LossConfig(kind="pg", clip_eps=0.2, kl_coef=0.05, agg=agg, norm_tokens=8)
    n, t = 5, int(mask.sum())
    full, _ = pg_loss(logp, mask, adv, old, ref, None, cfg, n, t)
    parts = [pg_loss(logp[s], mask[s], adv[s], old[s], ref[s], None, cfg, n, t)[0]
             for s in (slice(0, 2), slice(2, 5))]
    assert (parts[0] + parts[1]).item() == pytest.approx(full.item(), abs=1e-6)


def _clip_case(clip_eps=0.2, clip_eps_high=None, ratios=(1.5, 1.5, 0.5, 0.5)):
    cfg = LossConfig(kind="pg", clip_eps=clip_eps, clip_eps_high=clip_eps_high, agg="token_sum")
    logp = torch.zeros(4, 1, requires_grad=True)
    old = -torch.log(torch.tensor(ratios)).unsqueeze(-1)
    adv = torch.tensor([1.0, -1.0, 1.0, -1.0])
    loss, m = pg_loss(logp, torch.ones(4, 1), adv, old, None, None, cfg, 4, 4)
    loss.backward()
    return loss.item(), logp.grad.squeeze(-1), m


def test_clipping_both_sides():
    # r=1.5, A=+1 -> clipped at 1.2 (no gradient); r=1.5, A=-1 -> min(-1.5, -1.2) = -1.5 (gradient)
    # r=0.5, A=+1 -> min(0.5, 0.8) = 0.5 (gradient);  r=0.5, A=-1 -> min(-0.5, -0.8) = -0.8 (clipped)
    loss, grad, m = _clip_case()
    assert loss == pytest.approx(-(1.2 - 1.5 + 0.5 - 0.8) / 4)
    assert torch.allclose(grad, torch.tensor([0.0, 1.5, -0.5, 0.0]) / 4)
    assert m["clip_high_frac"] == pytest.approx(0.25) and m["clip_low_frac"] == pytest.approx(0.25)
    assert m["clip_frac"] == pytest.approx(0.5) and m["ratio"] == pytest.approx(1.0)


def test_clip_eps_high_is_asymmetric():
    # r=1.25 with A>0: clipped at 1.2 by eps=0.2, but not by eps_high=0.28 (DAPO clip-higher)
    loss, grad, _ = _clip_case(ratios=(1.25, 1.25, 0.75, 0.75))
    assert grad[0].item() == 0.0
    loss_hi, grad_hi, _ = _clip_case(clip_eps_high=0.28, ratios=(1.25, 1.25, 0.75, 0.75))
    assert grad_hi[0].item() == pytest.approx(1.25 * -1 / 4)
    assert loss_hi == pytest.approx(-(1.25 - 1.25 + 0.75 - 0.8) / 4)
    assert loss == pytest.approx(-(1.2 - 1.25 + 0.75 - 0.8) / 4)


def test_no_clip_with_old_logp_is_importance_weighted():
    cfg = LossConfig(kind="pg", clip_eps=None, agg="token_sum")
    logp = torch.zeros(1, 1, requires_grad=True)
    loss, _ = pg_loss(logp, torch.ones(1, 1), torch.tensor([1.0]), torch.tensor([[-math.log(3.0)]]),
                      None, None, cfg, 1, 1)
    loss.backward()
    assert loss.item() == pytest.approx(-3.0) and logp.grad.item() == pytest.approx(-3.0)


def test_kl_k3():
    # ref - logp = log 2 -> k3 = 2 - log 2 - 1; d k3 / d logp = 1 - exp(ref - logp) = -1
    cfg = LossConfig(kind="pg", clip_eps=0.2, kl_coef=0.1, agg="token_mean")
    logp = torch.tensor([[-1.0, -1.0]], requires_grad=True)
    ref = logp.detach() + math.log(2.0)
    loss, m = pg_loss(logp, torch.tensor([[1.0, 0.0]]), torch.tensor([0.0]), None, ref, None, cfg, 1, 2)
    loss.backward()
    k3 = 2.0 - math.log(2.0) - 1.0
    assert loss.item() == pytest.approx(0.1 * k3 / 2)
    assert m["kl"] == pytest.approx(k3) and m["kl_loss"] == pytest.approx(0.1 * k3 / 2)
    assert torch.allclose(logp.grad, torch.tensor([[0.1 * -1.0 / 2, 0.0]]))
    with pytest.raises(ValueError, match="reference"):
        pg_loss(logp, torch.ones(1, 2), torch.tensor([0.0]), None, None, None, cfg, 1, 2)


def test_kl_is_zero_at_reference():
    cfg = LossConfig(kind="pg", clip_eps=None, kl_coef=1.0, agg="token_sum")
    logp = torch.tensor([[-0.3, -2.0]], requires_grad=True)
    loss, m = pg_loss(logp, torch.ones(1, 2), torch.tensor([0.0]), None, logp.detach().clone(), None, cfg, 1, 2)
    loss.backward()
    assert loss.item() == 0.0 and m["kl"] == 0.0 and torch.all(logp.grad == 0)


def test_sft_token_mean_over_global_tokens():
    logp = torch.tensor([[-1.0, -2.0], [-3.0, -50.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, m = sft_loss(logp, mask, n_global_tokens=6)
    loss.backward()
    assert loss.item() == pytest.approx(6.0 / 6) and m["nll"] == pytest.approx(2.0)
    assert torch.allclose(logp.grad, torch.tensor([[-1.0, -1.0], [-1.0, 0.0]]) / 6)


def test_dpo():
    beta = 0.5
    pc, pr = torch.tensor([-5.0, -6.0], requires_grad=True), torch.tensor([-7.0, -6.0], requires_grad=True)
    rc, rr = torch.tensor([-6.0, -5.0]), torch.tensor([-6.0, -6.0])
    loss, m = dpo_loss(pc, pr, rc, rr, beta, n_global_pairs=4)
    loss.backward()
    # margins: 0.5*1 - 0.5*(-1) = 1.0 and 0.5*(-1) - 0 = -0.5
    expected = (math.log1p(math.exp(-1.0)) + math.log1p(math.exp(0.5))) / 4
    assert loss.item() == pytest.approx(expected)
    assert m["reward_margin"] == pytest.approx(0.25) and m["accuracy"] == pytest.approx(0.5)
    assert m["reward_chosen"] == pytest.approx(0.0) and m["reward_rejected"] == pytest.approx(-0.25)
    # d/d pc of -logsigmoid(beta*(...)) = -beta * sigmoid(-margin)
    sig = lambda x: 1 / (1 + math.exp(-x))  # noqa: E731
    assert pc.grad.tolist() == pytest.approx([-beta * sig(-1.0) / 4, -beta * sig(0.5) / 4])
    assert pr.grad.tolist() == pytest.approx([beta * sig(-1.0) / 4, beta * sig(0.5) / 4])


def test_token_logprobs_matches_log_softmax():
    torch.manual_seed(0)
    logits, targets = torch.randn(2, 3, 11), torch.randint(0, 11, (2, 3))
    ref = torch.log_softmax(logits, -1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    assert torch.allclose(token_logprobs(logits, targets), ref, atol=1e-6)


def test_bad_normaliser_raises():
    with pytest.raises(ValueError, match="normaliser"):
        sft_loss(torch.zeros(1, 1), torch.ones(1, 1), n_global_tokens=0)


# ---- off-policy correction (behaviour log-probs from the rollout engine) ---------------------------
# 2 samples x 3 tokens, the second one padded at t=2 (its behaviour value there is garbage that
# would give a huge weight). logp - behav = log w with w = [0.5, 1, 3] and [1.5, 4, -].
OP_LOGP = [[-1.0, -1.0, -1.0], [-2.0, -2.0, -9.0]]
OP_MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
OP_ADV = torch.tensor([1.0, -2.0])
OP_W = [[0.5, 1.0, 3.0], [1.5, 4.0, 1.0]]
OP_BEHAV = torch.tensor([[lp - math.log(w) for lp, w in zip(r, wr)] for r, wr in zip(OP_LOGP, OP_W)])
OP_BEHAV[1, 2] = -100.0


def _off_policy(mode, behav=OP_BEHAV, **kw):
    cfg = LossConfig(kind="pg", clip_eps=0.2, agg="token_sum", off_policy=mode, is_cap=2.0, **kw)
    logp = _logp(OP_LOGP)
    ref = logp.detach() + 0.5 if kw.get("kl_coef") else None
    loss, m = pg_loss(logp, OP_MASK, OP_ADV, None, ref, None, cfg, 2, 5, behav_logp=behav)
    loss.backward()
    return loss.item(), logp.grad, m


def test_tis_truncates_importance_weights():
    # ratio 1 (proximal = logp.detach()), no PPO clip; w -> min(w, 2) = [0.5, 1, 2], [1.5, 2]
    # loss = -(1 * 3.5 + (-2) * 3.5) / 2 = 1.75; d loss / d logp_t = -A_i w_t / 2
    loss, grad, m = _off_policy("tis")
    assert loss == pytest.approx(1.75)
    assert torch.allclose(grad, torch.tensor([[-0.25, -0.5, -1.0], [1.5, 2.0, 0.0]]))
    assert m["is_weight"] == pytest.approx((0.5 + 1 + 3 + 1.5 + 4) / 5)  # before truncation
    assert m["is_clip_frac"] == pytest.approx(2 / 5) and m["ratio"] == pytest.approx(1.0)


def test_decoupled_masks_tokens_over_the_cap():
    # w > 2 -> 0: [0.5, 1, 0], [1.5, 0]; loss = -(1 * 1.5 + (-2) * 1.5) / 2 = 0.75
    loss, grad, m = _off_policy("decoupled")
    assert loss == pytest.approx(0.75)
    assert torch.allclose(grad, torch.tensor([[-0.25, -0.5, 0.0], [1.5, 0.0, 0.0]]))
    assert m["is_weight"] == pytest.approx(2.0) and m["is_clip_frac"] == pytest.approx(2 / 5)


def test_off_policy_weight_uses_the_proximal_policy_and_leaves_kl_alone():
    # with old_logp given, w = exp(old - behav) and the PPO ratio is exp(logp - old)
    cfg = LossConfig(kind="pg", clip_eps=None, agg="token_sum", off_policy="tis", is_cap=10.0)
    logp = torch.zeros(1, 1, requires_grad=True)
    old, behav = torch.tensor([[-math.log(2.0)]]), torch.tensor([[-math.log(6.0)]])
    loss, m = pg_loss(logp, torch.ones(1, 1), torch.tensor([1.0]), old, None, None, cfg, 1, 1, behav_logp=behav)
    loss.backward()
    # ratio 2, weight 3: loss -6, gradient -ratio * w = -6
    assert loss.item() == pytest.approx(-6.0) and logp.grad.item() == pytest.approx(-6.0)
    assert m["is_weight"] == pytest.approx(3.0) and m["is_clip_frac"] == 0.0
    # the KL term is not importance-weighted
    _, _, on = _off_policy("none", kl_coef=0.1)
    for mode in ("tis", "decoupled"):
        _, _, off = _off_policy(mode, kl_coef=0.1)
        assert off["kl_loss"] == on["kl_loss"] and off["kl"] == on["kl"]


def _loss_and_grad(cfg, logp0, mask, adv, ref, weights, **kw):
    logp = logp0.clone().requires_grad_(True)
    loss, m = pg_loss(logp, mask, adv, None, ref, weights, cfg, 5, int(mask.sum()), **kw)
    loss.backward()
    return loss.detach(), logp.grad, m


@pytest.mark.parametrize("agg", ["token_sum", "token_sum_norm", "token_mean", "seq_mean_token_mean"])
@pytest.mark.parametrize("clip_eps,kl_coef", [(None, 0.0), (0.2, 0.0), (0.2, 0.05)])
def test_off_policy_off_is_bit_for_bit_todays_loss(agg, clip_eps, kl_coef):
    """No behaviour log-probs, or off_policy="none", or behaviour = proximal (w = 1 exactly, the
    synchronous K=0 case): the loss and gradients equal today's, bit for bit."""
    torch.manual_seed(0)
    logp0, ref, behav = -torch.rand(5, 4) * 3, -torch.rand(5, 4) * 3, -torch.rand(5, 4) * 3
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1], [1, 1, 0, 0], [1, 1, 1, 0]]).float()
    adv, weights = torch.randn(5), torch.rand(5) + 0.5
    kw = dict(kind="pg", clip_eps=clip_eps, kl_coef=kl_coef, agg=agg, norm_tokens=8)
    today_loss, today_grad, today_m = _loss_and_grad(LossConfig(**kw), logp0, mask, adv, ref, weights)
    variants = [(LossConfig(**kw, off_policy="none"), behav), (LossConfig(**kw, off_policy="none", is_cap=1.0), behav)]
    variants += [(LossConfig(**kw, off_policy=mode), b) for mode in ("tis", "decoupled") for b in (None, logp0)]
    for cfg, b in variants:
        loss, grad, m = _loss_and_grad(cfg, logp0, mask, adv, ref, weights, behav_logp=b)
        assert torch.equal(loss, today_loss) and torch.equal(grad, today_grad)
        if b is None or cfg.off_policy == "none":
            assert m == today_m
        else:  # behaviour = proximal: every weight is exactly 1, none truncated
            assert m["is_weight"] == 1.0 and m["is_clip_frac"] == 0.0


def test_off_policy_config_and_shape_errors():
    with pytest.raises(ValueError, match="off_policy 'ppo' is not one of"):
        LossConfig(kind="pg", agg="token_mean", off_policy="ppo")
    for bad in (0.5, 0, -1.0, float("nan"), "2", True, None):
        with pytest.raises(ValueError, match="is_cap"):
            LossConfig(kind="pg", agg="token_mean", off_policy="tis", is_cap=bad)
    assert LossConfig(kind="pg", agg="token_mean", off_policy="decoupled", is_cap=float("inf")).is_cap == float("inf")
    cfg = LossConfig(kind="pg", agg="token_mean", off_policy="tis")
    with pytest.raises(ValueError, match="behav_logp has shape"):
        pg_loss(_logp(OP_LOGP), OP_MASK, OP_ADV, None, None, None, cfg, 2, 5, behav_logp=OP_BEHAV[:, :2])
