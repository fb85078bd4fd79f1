"""Shared-prompt forward (each distinct prompt once, completions on its KV cache) vs the flat
forward: the same log-probs and the same gradients, on a tiny model in fp32."""
import random

import pytest
import torch

from marl_llm.learner.worker import forward_logp, micro_batches, prompt_groups, shares_prompts
from marl_llm.types import Sample


@pytest.fixture(scope="module")
def tiny_model(tiny_model_path):
    from transformers import AutoModelForCausalLM
    torch.manual_seed(0)
    return AutoModelForCausalLM.from_pretrained(tiny_model_path, dtype=torch.float32).eval()


def _seqs(seed=0):
    rng = random.Random(seed)
    tok = lambda n: [rng.randrange(5, 200) for _ in range(n)]  # noqa: E731
    p1, p2, p3 = tok(9), tok(5), tok(12)
    # two groups (different prompt lengths), a singleton, completions of length 1..7
    return [(p1, tok(7)), (p2, tok(3)), (p1, tok(1)), (p1, tok(6)), (p2, tok(7)), (p3, tok(4))]


def _per_sample(logp, mask, cols, seqs):
    return [logp[b, col: col + len(c)] for b, ((_, c), col) in enumerate(zip(seqs, cols))]


def _loss_and_grads(model, seqs, share):
    model.zero_grad()
    logp, mask, cols = forward_logp(model, seqs, 0, torch.device("cpu"), grad=True, share=share)
    adv = torch.linspace(-1, 1, len(seqs))
    loss = ((logp * mask).sum(-1) * adv).sum()
    loss.backward()
    grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), _per_sample(logp.detach(), mask, cols, seqs), grads


def test_shared_prompt_forward_matches_flat_logprobs_and_gradients(tiny_model):
    seqs = _seqs()
    assert shares_prompts(seqs) and not shares_prompts(seqs, "false")
    loss_f, lp_f, g_f = _loss_and_grads(tiny_model, seqs, "false")
    loss_s, lp_s, g_s = _loss_and_grads(tiny_model, seqs, "true")
    for a, b in zip(lp_f, lp_s):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(loss_f, loss_s, rtol=1e-5, atol=1e-5)
    assert g_f.keys() == g_s.keys() and len(g_f) > 0
    for n in g_f:
        torch.testing.assert_close(g_f[n], g_s[n], rtol=1e-4, atol=1e-6, msg=n)


def test_shared_forward_without_repeats_is_the_flat_forward(tiny_model):
    seqs = [(p, c) for p, c in _seqs()[:2]]  # distinct prompts: auto keeps the flat path
    assert not shares_prompts(seqs)
    a = forward_logp(tiny_model, seqs, 0, torch.device("cpu"), grad=False, share="auto")
    b = forward_logp(tiny_model, seqs, 0, torch.device("cpu"), grad=False, share="true")
    for x, y in zip(_per_sample(*a, seqs), _per_sample(*b, seqs)):
        torch.testing.assert_close(x, y, rtol=1e-5, atol=1e-5)


def test_micro_batches_keep_groups_together():
    seqs = _seqs()
    samples = [Sample(p, c) for p, c in seqs]
    distinct, owner = prompt_groups([s.prompt_ids for s in samples])
    assert len(distinct) == 3 and owner == [0, 1, 0, 0, 1, 2]
    mbs = micro_batches(samples, 4)
    assert sorted(i for m in mbs for i in m) == list(range(len(samples)))
    assert all(len(m) <= 4 for m in mbs)
    assert mbs[0] == [0, 2, 3]  # the p1 group whole; p2's pair does not fit next to it
    assert micro_batches(samples, 2)[:2] == [[0, 2], [3]]  # a group larger than the size is split


def test_micro_batches_respect_a_token_budget():
    samples = [Sample(p, c) for p, c in _seqs()]  # p1 (9 tokens) x3: completions 7, 1, 6
    # p1's group is 9 + 7 + 1 + 6 = 23 tokens: a budget of 17 splits it after two samples
    mbs = micro_batches(samples, 16, max_tokens=17)
    assert mbs[0] == [0, 2]
    for m in mbs:
        distinct = {tuple(samples[i].prompt_ids) for i in m}
        tokens = sum(len(p) for p in distinct) + sum(len(samples[i].completion_ids) for i in m)
        assert tokens <= 17 or len(m) == 1
    assert sorted(i for m in mbs for i in m) == list(range(len(samples)))
    assert micro_batches(samples, 16, max_tokens=1) == [[0], [2], [3], [1], [4], [5]]  # one sample each at least


@pytest.mark.parametrize("share", ["false", "true"])
def test_logprobs_at_the_sampling_temperature_come_from_the_same_forward(tiny_model, share):
    """What a rollout engine sampled from at temperature T: log_softmax(logits / T), detached."""
    seqs = _seqs()
    logp, mask, cols, scaled = forward_logp(tiny_model, seqs, 0, torch.device("cpu"), grad=True, share=share,
                                            temperature=0.5)
    assert not scaled.requires_grad and scaled.shape == logp.shape
    for b, ((p, c), col) in enumerate(zip(seqs, cols)):
        with torch.no_grad():
            logits = tiny_model(input_ids=torch.tensor([p + c])).logits[0, len(p) - 1: len(p) + len(c) - 1]
        want = torch.log_softmax(logits.float() / 0.5, -1).gather(-1, torch.tensor(c).unsqueeze(-1)).squeeze(-1)
        torch.testing.assert_close(scaled[b, col: col + len(c)], want, rtol=1e-4, atol=1e-4)
    assert len(forward_logp(tiny_model, seqs, 0, torch.device("cpu"), grad=False, share=share)) == 3
