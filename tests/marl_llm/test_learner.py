"""The DeepSpeed ZeRO-3 learner group on Ray with the tiny random Llama (CPU, gloo, fp32).

One 2-rank group is started per module and reused; the tests run in file order and each one
only relies on what it sets up itself (reference snapshots, saved states), not on the weights
left by the previous test. The 1-rank group exists only for the 2-ranks == 1-rank check.
"""
import math
import os
import random

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()

import torch  # noqa: E402

from marl_llm.config import LearnerConfig, ModelConfig  # noqa: E402
from marl_llm.losses import LossConfig  # noqa: E402
from marl_llm.models import resolve_model  # noqa: E402
from marl_llm.types import PairSample, Sample  # noqa: E402

ray = pytest.importorskip("ray")
pytest.importorskip("deepspeed")

MODEL_CFG = ModelConfig(name="tiny", source="tiny")


def learner_cfg(num_ranks):
    return LearnerConfig(num_ranks=num_ranks, num_cpus=1, zero_stage=3, lr=5e-3, grad_clip=1.0,
                         micro_batch_size=2, bf16="false", timeout_s=120)


def make_samples(n, seed, adv=True):
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        prompt = [1] + [rng.randrange(100, 3000) for _ in range(rng.randrange(2, 9))]
        comp = [rng.randrange(100, 3000) for _ in range(rng.randrange(2, 12))]
        out.append(Sample(prompt, comp, advantage=rng.uniform(-1, 1) if adv else 0.0))
    return out


def hf_logprobs(model, samples):
    out = []
    for s in samples:
        ids = torch.tensor([s.prompt_ids + s.completion_ids])
        with torch.no_grad():
            lp = model(ids).logits[0].float().log_softmax(-1)
        p = len(s.prompt_ids)
        out.append([lp[p - 1 + i, c].item() for i, c in enumerate(s.completion_ids)])
    return out


def max_diff(a, b):
    assert [len(x) for x in a] == [len(y) for y in b]
    return max(abs(u - v) for x, y in zip(a, b) for u, v in zip(x, y))


# ---- pure helpers (no Ray) -----------------------------------------------------------------------
def test_pack_aligns_targets_and_mask():
    from marl_llm.learner.worker import pack

    ids, attn, start, targets, mask, cols = pack([([1, 5, 6], [7, 8]), ([1, 9], [10, 11, 12])], pad_id=0)
    assert ids.tolist() == [[1, 5, 6, 7, 8], [1, 9, 10, 11, 12]] and attn.sum().item() == 10
    assert start == 1  # logits before the shortest prompt's last token are never needed
    # position start+j predicts targets[:, j]; the mask picks the completion tokens
    assert [[t for t, m in zip(tr, mr) if m] for tr, mr in zip(targets.tolist(), mask.tolist())] == \
        [[7, 8], [10, 11, 12]]
    assert cols == [1, 0]


def test_shard_by_length_balances():
    from marl_llm.learner.group import shard_by_length

    items = [Sample([1], [2] * n) for n in (9, 1, 7, 3, 5, 2, 8)]
    shards = shard_by_length(items, 2)
    assert sorted(i for s in shards for i in s) == list(range(7))
    assert abs(len(shards[0]) - len(shards[1])) <= 1
    tokens = [sum(len(items[i].completion_ids) for i in s) for s in shards]
    assert abs(tokens[0] - tokens[1]) <= 9
    assert shard_by_length(items[:1], 3) == [[0], [], []]


def test_validate_samples_and_metric_combination():
    from marl_llm.learner.group import _combine
    from marl_llm.learner.worker import validate_samples

    pg = LossConfig(kind="pg", clip_eps=0.2, agg="token_mean")
    with pytest.raises(TypeError, match="PairSample"):
        validate_samples([Sample([1], [2])], LossConfig(kind="dpo"))
    with pytest.raises(ValueError, match="no prompt tokens"):
        validate_samples([Sample([], [2])], pg)
    m = _combine([{"loss": 0.25, "kl_loss": 0.01, "ratio": 1.0, "grad_norm": 2.0, "_weight": 3.0},
                  {"loss": 0.5, "kl_loss": 0.02, "ratio": 2.0, "grad_norm": 2.0, "_weight": 1.0}])
    assert m["loss"] == pytest.approx(0.75) and m["kl_loss"] == pytest.approx(0.03)
    assert m["ratio"] == pytest.approx(1.25) and m["grad_norm"] == 2.0


def test_validate_behavior_logprobs():
    from marl_llm.learner.worker import validate_samples

    pg = LossConfig(kind="pg", clip_eps=0.2, agg="token_mean", off_policy="tis")
    ok = [Sample([1], [2, 3], behavior_logprobs=[-1.0, -0.5]), Sample([1], [4], behavior_logprobs=[-2.0])]
    validate_samples(ok, pg)
    validate_samples([Sample([1], [2]), Sample([1], [4])], pg)  # none is fine too
    with pytest.raises(ValueError, match="sample 1 has no behavior_logprobs but sample 0 has"):
        validate_samples([ok[0], Sample([1], [4]), ok[1]], pg)
    with pytest.raises(ValueError, match="sample 0 has no behavior_logprobs but sample 2 has"):
        validate_samples([Sample([1], [4]), Sample([1], [4]), ok[1]], pg)
    with pytest.raises(ValueError, match="sample 1: behavior_logprobs has 1 entries for 2 completion tokens"):
        validate_samples([ok[1], Sample([1], [2, 3], behavior_logprobs=[-1.0])], pg)
    with pytest.raises(ValueError, match="sample 0: behavior_logprobs contains NaN"):
        validate_samples([Sample([1], [2], behavior_logprobs=[float("nan")])], pg)
    # SFT ignores them: a mixed batch is fine there
    validate_samples([ok[0], Sample([1], [4])], LossConfig(kind="sft"))


class _Uniform(torch.nn.Module):
    """A stand-in causal LM with uniform logits over 16 tokens: every token has log-prob -log 16."""

    def forward(self, input_ids, attention_mask=None, logits_to_keep=0, **_):
        from types import SimpleNamespace
        return SimpleNamespace(logits=torch.zeros(*input_ids.shape, 16)[:, -logits_to_keep:])


def test_pg_micro_passes_behaviour_logprobs():
    """_pg_micro places Sample.behavior_logprobs at the completion columns and corrects the loss
    only with off_policy != none (a stand-in worker: uniform model, no Ray, no DeepSpeed)."""
    from types import SimpleNamespace

    from marl_llm.learner.worker import LearnerWorker, forward_logp

    worker = SimpleNamespace(engine=_Uniform(), device=torch.device("cpu"),
                             _forward_logp=lambda m, seqs, grad, temperature=None: forward_logp(
                                 m, seqs, 0, "cpu", grad, "false", temperature))
    u = -math.log(16.0)
    # different prompt lengths: the completions start at different columns
    batch = [Sample([1, 5, 6], [7, 8], advantage=1.0, behavior_logprobs=[u - math.log(0.5), u - math.log(3.0)]),
             Sample([1, 9], [10, 11, 12], advantage=-2.0, behavior_logprobs=[u, u - math.log(4.0), u])]

    def run(mode, temperature=1.0):  # a uniform model has the same log-probs at every temperature
        cfg = LossConfig(kind="pg", clip_eps=0.2, agg="token_sum", off_policy=mode, is_cap=2.0,
                         behavior_temperature=temperature)
        loss, m, n_tok = LearnerWorker._pg_micro(worker, batch, cfg, None, 2, 5)
        assert n_tok == 5.0
        return loss.item(), m

    # weights [0.5, 3], [1, 4, 1]; loss = -(sum_i A_i sum_t w_t) / 2
    assert run("none")[0] == pytest.approx(-(1.0 * 2 - 2.0 * 3) / 2)
    loss, m = run("tis")  # [0.5, 2], [1, 2, 1]
    assert loss == pytest.approx(-(2.5 - 2.0 * 4) / 2) and m["is_clip_frac"] == pytest.approx(2 / 5)
    assert m["is_weight"] == pytest.approx((0.5 + 3 + 1 + 4 + 1) / 5)
    loss, m = run("decoupled")  # [0.5, 0], [1, 0, 1]
    assert loss == pytest.approx(-(0.5 - 2.0 * 2) / 2) and m["is_clip_frac"] == pytest.approx(2 / 5)
    assert run("tis", temperature=0.7)[0] == pytest.approx(run("tis")[0])
    for s in batch:
        s.behavior_logprobs = None
    assert run("tis") == run("none")


def test_warmup_scheduler_ramps_linearly_from_the_first_step():
    from marl_llm.learner.worker import warmup_scheduler

    assert warmup_scheduler(0) is None
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.3)
    sched = warmup_scheduler(3)(opt)
    lrs = []
    for _ in range(5):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == pytest.approx([0.1, 0.2, 0.3, 0.3, 0.3])


def test_scatter_tokens_places_values_at_the_completion_columns():
    from marl_llm.learner.worker import forward_logp, pack, scatter_tokens

    seqs = [([1, 5, 6], [7, 8]), ([1, 9], [10, 11, 12])]
    _, _, _, _, mask, cols = pack(seqs, pad_id=0)
    placed = scatter_tokens([[0.5, 0.25], [1.0, 2.0, 3.0]], cols, mask.shape)
    assert placed.tolist() == [[0.0, 0.5, 0.25], [1.0, 2.0, 3.0]]
    assert torch.equal(placed != 0, mask > 0)
    # the cols forward_logp returns (what _pg_micro places with), on a stand-in model
    logp, mask2, cols2 = forward_logp(_Uniform(), [([1, 2], [3, 4, 5]), ([1, 2, 6], [7])], 0, "cpu", False, "false")
    placed = scatter_tokens([[-1.0, -2.0, -3.0], [-4.0]], cols2, logp.shape)
    assert torch.equal(placed != 0, mask2 > 0)
    assert placed[mask2 > 0].tolist() == [-1.0, -2.0, -3.0, -4.0]
    with pytest.raises(ValueError, match="do not fit"):
        scatter_tokens([[0.0] * 4], [0], (1, 3))


# ---- the Ray + DeepSpeed group ---------------------------------------------------------------------
@pytest.fixture(scope="module")
def model_path():
    return resolve_model(MODEL_CFG)


@pytest.fixture(scope="module")
def group(ray_session, model_path):
    from marl_llm.learner.group import LearnerGroup

    g = LearnerGroup("tiny", model_path, MODEL_CFG, learner_cfg(2), 0, True, runtime.actor_env())
    yield g
    g.shutdown()


def test_logprobs_match_hf_forward(group, model_path):
    from transformers import AutoModelForCausalLM

    assert group.world_size == 2 and group.backend == "gloo"
    assert all(i["loaded_partitioned"] for i in group.info)  # ZeRO-3 loads through zero.Init
    samples = make_samples(5, seed=1)
    lp = group.logprobs(samples)
    assert [len(x) for x in lp] == [len(s.completion_ids) for s in samples]
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    assert max_diff(lp, hf_logprobs(model, samples)) < 1e-5
    # the reference starts as the same weights
    assert max_diff(group.logprobs(samples, reference=True), lp) < 1e-6


def test_two_ranks_equal_one_rank(group, ray_session, model_path):
    """Global normalisers: 2 ranks with unequal shards (one runs an empty micro-batch) take
    the same optimiser steps as 1 rank on the whole batch. Runs first on a fresh group."""
    from marl_llm.learner.group import LearnerGroup

    one = LearnerGroup("tiny1", model_path, MODEL_CFG, learner_cfg(1), 0, True, runtime.actor_env())
    try:
        probe = make_samples(4, seed=9)
        assert max_diff(one.logprobs(probe), group.logprobs(probe)) < 1e-6, "group was trained before"
        batch = make_samples(5, seed=2)  # shards of 3 and 2 -> rank 1 pads with an empty micro-batch
        # step 1: clipped PG + KL against the in-worker reference, DAPO token mean
        loss1 = LossConfig(kind="pg", clip_eps=0.2, kl_coef=0.1, agg="token_mean")
        m2, m1 = group.train_step(batch, loss1), one.train_step(batch, loss1)
        assert m2["n_micro"] == 2 and m1["n_micro"] == 3
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5, abs=1e-7)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-5)
        assert m2["global_step"] == m1["global_step"] == 1
        # step 2: GRPO seq-mean-token-mean with an asymmetric clip, 3 samples
        batch = make_samples(3, seed=3)
        assert max_diff(group.logprobs(batch), one.logprobs(batch)) < 1e-5
        loss2 = LossConfig(kind="pg", clip_eps=0.2, clip_eps_high=0.28, agg="seq_mean_token_mean")
        m2, m1 = group.train_step(batch, loss2), one.train_step(batch, loss2)
        assert m2["loss"] == pytest.approx(m1["loss"], rel=1e-5)
        assert m2["ratio"] == pytest.approx(m1["ratio"], rel=1e-5)
        assert m2["grad_norm"] == pytest.approx(m1["grad_norm"], rel=1e-4)
        after2, after1 = group.logprobs(probe), one.logprobs(probe)
        assert max_diff(after2, after1) < 1e-4
        before = one.logprobs(probe, reference=True)
        assert max_diff(after1, before) > 1e-3, "the steps did not change the weights"
    finally:
        one.shutdown()


def test_zero_advantage_samples_are_not_computed_and_the_step_is_unchanged(ray_session, model_path, monkeypatch):
    """A group whose samples all got the same reward carries no gradient (no KL): the learner
    skips it, and the optimiser steps are the same as on the full batch (every aggregation)."""
    from marl_llm.learner import group as lg

    skip = lg.LearnerGroup("tinyskip", model_path, MODEL_CFG, learner_cfg(1), 0, True, runtime.actor_env())
    full = lg.LearnerGroup("tinyfull", model_path, MODEL_CFG, learner_cfg(1), 0, True, runtime.actor_env())
    try:
        batch = make_samples(6, seed=4)
        for s, a in zip(batch, [0.5, 0.0, 0.0, -0.5, 0.0, 1.0]):
            s.advantage = a
        steps = [LossConfig(kind="pg", clip_eps=0.2, agg="token_sum_norm", norm_tokens=16),
                 LossConfig(kind="pg", clip_eps=0.2, agg="token_mean")]
        for loss in steps:
            ms = skip.train_step(batch, loss)
            with monkeypatch.context() as m:
                m.setattr(lg, "gradient_carrying", lambda samples, loss: samples)
                mf = full.train_step(batch, loss)
            assert (ms["n_trained"], ms["n_samples"], mf["n_trained"]) == (3, 6, 6)
            assert ms["grad_norm"] == pytest.approx(mf["grad_norm"], rel=1e-5)
        probe = make_samples(4, seed=9)
        assert max_diff(skip.logprobs(probe), full.logprobs(probe)) < 1e-5
        # nothing carries a gradient: one sample is computed and the optimiser still steps
        m = skip.train_step(make_samples(3, seed=5, adv=False), steps[0])
        assert m["n_trained"] == 1 and m["global_step"] == 3
        # with a KL term every sample counts
        kl = LossConfig(kind="pg", clip_eps=0.2, kl_coef=0.1, agg="token_mean")
        assert lg.gradient_carrying(batch, kl) == batch
    finally:
        skip.shutdown()
        full.shutdown()


def test_sft_lowers_loss_and_save_hf_roundtrip(group, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    samples = make_samples(4, seed=4)
    before = group.logprobs(samples)
    losses = [group.train_step(samples, LossConfig(kind="sft"))["loss"] for _ in range(4)]
    n_tok = sum(len(s.completion_ids) for s in samples)
    # the reported loss is the global token-mean NLL (before the step) ...
    assert losses[0] == pytest.approx(-sum(map(sum, before)) / n_tok, rel=1e-5)
    assert losses[-1] < losses[0] - 0.05, losses
    after = group.logprobs(samples)
    assert sum(map(sum, after)) > sum(map(sum, before))

    out = group.save_hf(str(tmp_path / "hf"))
    assert os.path.isfile(os.path.join(out, "config.json"))
    model = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert max_diff(hf_logprobs(model, samples), after) < 1e-5
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    keys = set(load_file(os.path.join(out, "model.safetensors")))
    assert "model.embed_tokens.weight" in keys
    assert AutoTokenizer.from_pretrained(out) is not None
    import json
    assert "rope_theta" in json.load(open(os.path.join(out, "config.json")))


def test_save_state_load_state_exact_resume(group, tmp_path):
    probe, batch = make_samples(4, seed=5), make_samples(4, seed=6)
    sft = LossConfig(kind="sft")
    group.train_step(batch, sft)  # so the optimiser has moments to restore
    group.save_state(str(tmp_path / "state"))
    saved_lp, saved_counts = group.logprobs(probe), group.counters()
    assert saved_counts["global_steps"] >= 1 and saved_counts["optimizer_steps"] == saved_counts["global_steps"]
    m_a = group.train_step(batch, sft)
    after_a = group.logprobs(probe)
    assert group.counters()["global_steps"] == saved_counts["global_steps"] + 1
    assert max_diff(after_a, saved_lp) > 1e-4

    info = group.load_state(str(tmp_path / "state"))
    assert info["global_steps"] == saved_counts["global_steps"]
    assert group.counters() == saved_counts
    assert max_diff(group.logprobs(probe), saved_lp) < 1e-6
    # the same step again gives the same weights: optimizer moments were restored too
    m_b = group.train_step(batch, sft)
    assert m_b["loss"] == pytest.approx(m_a["loss"], rel=1e-6)
    assert max_diff(group.logprobs(probe), after_a) < 1e-6


def test_dpo_raises_margin(group):
    rng = random.Random(7)
    pairs = []
    for _ in range(3):
        prompt = [1] + [rng.randrange(100, 3000) for _ in range(4)]
        pairs.append(PairSample(prompt, [rng.randrange(100, 3000) for _ in range(rng.randrange(3, 7))],
                                [rng.randrange(100, 3000) for _ in range(rng.randrange(3, 7))]))

    def margins():
        ch = group.logprobs([Sample(p.prompt_ids, p.chosen_ids) for p in pairs])
        rj = group.logprobs([Sample(p.prompt_ids, p.rejected_ids) for p in pairs])
        return [sum(c) - sum(r) for c, r in zip(ch, rj)]

    group.snapshot_reference()  # DPO after SFT: the reference is the current policy
    chosen = [Sample(p.prompt_ids, p.chosen_ids) for p in pairs]
    assert max_diff(group.logprobs(chosen, reference=True), group.logprobs(chosen)) < 1e-6
    ref_chosen = group.logprobs(chosen)
    start = margins()
    loss = LossConfig(kind="dpo", beta=0.1)
    m = group.train_step(pairs, loss)  # reference log-probs computed by the workers
    assert m["loss"] == pytest.approx(math.log(2.0), abs=1e-5)  # policy == reference
    assert m["reward_margin"] == pytest.approx(0.0, abs=1e-5)
    for _ in range(3):
        m = group.train_step(pairs, loss)
    end = margins()
    assert sum(end) / len(end) > sum(start) / len(start) + 0.5, (start, end)
    assert m["reward_margin"] > 0 and m["loss"] < math.log(2.0)
    # the reference stayed frozen
    assert max_diff(group.logprobs(chosen, reference=True), ref_chosen) < 1e-6


def test_push_weights_to_receivers(group, tmp_path):
    pytest.importorskip("marl_llm.weight_sync")
    from safetensors.torch import load_file

    class Receiver:  # stands in for a rollout worker: joins the sync group, keeps what it got
        def __init__(self):
            self.sync, self.got = None, None

        def init_weight_sync(self, addr, port, rank, world, timeout):
            from marl_llm.weight_sync import WeightSyncGroup
            self.sync = WeightSyncGroup(addr, port, rank, world, timeout)
            return True

        def receive_weights(self, meta):
            self.got = {n: t.clone() for n, t in self.sync.receive(meta)}
            return len(self.got)

        def weights(self):
            return self.got

    receivers = [ray.remote(Receiver).options(num_cpus=0).remote() for _ in range(2)]
    group.train_step(make_samples(2, seed=8), LossConfig(kind="sft"))
    info = group.push_weights(receivers, timeout_s=120)
    assert info["bytes"] > 0
    saved = load_file(os.path.join(group.save_hf(str(tmp_path / "hf")), "model.safetensors"))
    for r in receivers:
        got = ray.get(r.weights.remote())
        assert set(got) == set(saved)  # tied lm_head sent once, like the safetensors file
        assert all(torch.equal(got[k], saved[k]) for k in saved)
    # a second push reuses the group
    group.train_step(make_samples(2, seed=8), LossConfig(kind="sft"))
    group.push_weights(receivers, timeout_s=120)
    got = ray.get(receivers[0].weights.remote())
    assert not torch.equal(got["model.norm.weight"], saved["model.norm.weight"]) or \
        not torch.equal(got["model.embed_tokens.weight"], saved["model.embed_tokens.weight"])
    for r in receivers:
        ray.kill(r)


def _smoke(g, tmp_path, steps=3):
    """Train a few SFT steps; the HF folder reproduces the learner; the reference snapshot works."""
    from transformers import AutoModelForCausalLM

    samples = make_samples(4, seed=11)
    losses = [g.train_step(samples, LossConfig(kind="sft"))["loss"] for _ in range(steps)]
    assert losses[-1] < losses[0], losses
    lp = g.logprobs(samples)
    model = AutoModelForCausalLM.from_pretrained(g.save_hf(str(tmp_path / "hf")), dtype=torch.float32).eval()
    g.snapshot_reference()
    assert max_diff(g.logprobs(samples, reference=True), lp) < 1e-6
    return lp, hf_logprobs(model, samples)


@pytest.mark.slow
@pytest.mark.parametrize("stage", [0, 2])
def test_other_zero_stages(ray_session, model_path, tmp_path, stage):
    from marl_llm.learner.group import LearnerGroup

    cfg = learner_cfg(2)
    cfg.zero_stage = stage
    g = LearnerGroup(f"z{stage}", model_path, MODEL_CFG, cfg, 0, False, runtime.actor_env())
    try:
        lp, hf = _smoke(g, tmp_path)
        assert max_diff(lp, hf) < 1e-5
    finally:
        g.shutdown()


@pytest.mark.slow
def test_bf16_gradient_checkpointing_offload(ray_session, model_path, tmp_path):
    from marl_llm.learner.group import LearnerGroup

    cfg = learner_cfg(2)
    cfg.bf16, cfg.gradient_checkpointing, cfg.offload_optimizer = "true", True, True
    g = LearnerGroup("bf16", model_path, MODEL_CFG, cfg, 0, False, runtime.actor_env())
    try:
        assert g.info[0]["bf16"]
        lp, hf = _smoke(g, tmp_path)
        assert max_diff(lp, hf) < 0.1  # bf16 forward in the learner vs fp32 forward of the saved weights
    finally:
        g.shutdown()


@pytest.mark.parametrize("engine_dtype, bf16", [("bfloat16", True), ("float32", False)])
def test_auto_precision_follows_the_rollout_engines_dtype_on_cpu(ray_session, model_path, engine_dtype, bf16):
    """learner.bf16=auto on a CPU: the DeepSpeed group trains in the dtype the engine samples in,
    whatever the processor offers (so a run's numbers do not depend on it)."""
    import dataclasses

    from marl_llm.learner.group import LearnerGroup

    cfg = learner_cfg(1)
    cfg.bf16 = "auto"
    g = LearnerGroup("auto", model_path, dataclasses.replace(MODEL_CFG, dtype=engine_dtype), cfg, 0, False,
                     runtime.actor_env())
    try:
        assert g.info[0]["bf16"] is bf16
    finally:
        g.shutdown()


def test_warmup_steps_through_deepspeed_and_resume(ray_session, model_path, tmp_path):
    """learner.warmup_steps in a real ZeRO-3 group: the optimiser steps run at lr/3, 2lr/3, lr, and a
    state saved mid-warm-up resumes at the same point of the ramp with the same weights."""
    from marl_llm.learner.group import LearnerGroup

    cfg = learner_cfg(1)
    cfg.warmup_steps = 3
    g = LearnerGroup("warm", model_path, MODEL_CFG, cfg, 0, True, runtime.actor_env())
    try:
        sft, batch, probe = LossConfig(kind="sft"), make_samples(4, seed=11), make_samples(4, seed=12)
        lrs = [g.train_step(batch, sft)["lr"]]
        g.save_state(str(tmp_path / "state"))
        lrs += [g.train_step(batch, sft)["lr"] for _ in range(3)]
        assert lrs == pytest.approx([cfg.lr / 3, 2 * cfg.lr / 3, cfg.lr, cfg.lr])
        after = g.logprobs(probe)
        g.load_state(str(tmp_path / "state"))
        assert [g.train_step(batch, sft)["lr"] for _ in range(3)] == pytest.approx(lrs[1:])
        assert max_diff(g.logprobs(probe), after) < 1e-6
    finally:
        g.shutdown()


@pytest.mark.slow
def test_start_failure_names_the_rank(ray_session, tmp_path):
    from marl_llm.learner.group import LearnerGroup

    with pytest.raises(RuntimeError, match=r"start failed on rank \d"):
        LearnerGroup("broken", str(tmp_path / "no-such-model"), MODEL_CFG, learner_cfg(2), 0, False,
                     runtime.actor_env(), start_timeout_s=300)
