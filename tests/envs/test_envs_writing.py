"""MAGRPO's four-level writing reward pinned on hand-built texts: every level boundary, ramp and
early stop for TLDR and arXiv; the grounding term; the writing envs' data, prompts and reference
scoring. (Parity with the authors' code: test_writing_parity.py.)"""
import subprocess
import sys
from pathlib import Path

import pytest

from envs.base import make_env
from envs.writing import (ARXIV_REWARD, TLDR_REWARD, WritingRewardConfig, content_words, grounding, jaccard,
                          split_single, transition_categories, transition_score, writing_reward)

EXAMPLES = Path(__file__).resolve().parents[2] / "examples" / "data"
TLDR = WritingRewardConfig(**TLDR_REWARD)
ARXIV = WritingRewardConfig(**ARXIV_REWARD)


def W(prefix, n, start=0):
    """n distinct non-stop-word, non-transition tokens (prefix + 3 digits)."""
    return [f"{prefix}{i:03d}" for i in range(start, start + n)]


def T(words, length=None):
    """Words joined by spaces, padded with a trailing run of dots to exactly `length` characters
    (dots change neither the whitespace word count nor the \\w+ word set)."""
    s = " ".join(words)
    if length is not None:
        assert len(s) <= length, (len(s), length)
        s += "." * (length - len(s))
    return s


def R(c1, c2, cfg=TLDR):
    return writing_reward(c1, c2, cfg)


def approx(x):
    return pytest.approx(x, abs=1e-9)


# ---- level 1: word-count window -------------------------------------------------------------------
def test_l1_window_tldr():
    ok1 = T(W("aa", 8), 100)  # 8 words: lower edge
    assert R(T(W("aa", 7), 100), T(W("bb", 20), 200)).total == 0  # 7 words: stop
    assert R(T(W("aa", 7), 100), T(W("bb", 20), 200)).info["stopped_at"] == 1
    assert R(ok1, T(W("bb", 7), 200)).total == 0
    r = R(ok1, T(W("bb", 256)))  # 256 words: upper edge, passes L1 (then L2 stops: ratio ~15)
    assert r.components["structure"] == 0.5 and r.info["stopped_at"] == 2
    assert R(ok1, T(W("bb", 257))).total == 0
    assert R("", "").total == 0


def test_l1_window_arxiv():
    c2 = T(W("bb", 128), 1000)
    assert R(T(W("aa", 127), 900), c2, ARXIV).info["stopped_at"] == 1
    assert R(T(W("aa", 128), 900), c2, ARXIV).components["structure"] > 0.5
    assert R(T(W("aa", 257), 2000), T(W("bb", 256), 2000), ARXIV).info["stopped_at"] == 1


# ---- level 2: character-length ratio --------------------------------------------------------------
C1 = T(W("aa", 10), 100)  # 10 words, 10 unique, 100 chars


def _c2(length, n_unique=20):
    return T(W("b", n_unique), length)  # 4-char tokens: 20 words = 99 chars


@pytest.mark.parametrize("length,l2", [
    (109, None),                      # 1.09: below the ramp -> stop
    (110, 0.0),                       # 1.10: ramp start, 0 but passes
    (135, (1.35 - 1.1) / 0.5),        # up-ramp
    (160, 1.0), (250, 1.0), (320, 1.0),  # full band edges
    (410, 1 - (4.1 - 3.2) / 1.8),     # down-ramp
    (500, 0.0),                       # 5.0: ramp end, 0 but passes
    (501, None),                      # 5.01 -> stop
])
def test_l2_ratio_tldr(length, l2):
    r = R(C1, _c2(length))
    if l2 is None:
        assert r.info["stopped_at"] == 2 and r.total == approx(0.5)
        assert r.components == {"structure": 0.5, "coherence": 0.0, "consistency": 0.0, "grounding": 0.0,
                                "total": 0.5}
    else:
        assert r.info["l2"] == approx(l2)
        assert r.info["stopped_at"] is None  # 20 vs 10 unique words: L3 full, reaches L4
        assert r.components["structure"] == approx(0.5 + l2 + 0.5)


@pytest.mark.parametrize("ratio_len,l2", [  # the authors' code: 1.3-1.6 full, 0.8-2.0 ramps
    (790, None), (800, 0.0), (1000, 0.4), (1300, 1.0), (1600, 1.0), (1800, 0.5), (2000, 0.0), (2010, None)])
def test_l2_ratio_arxiv(ratio_len, l2):
    c1 = T(W("aa", 130), 1000)
    c2 = T(W("bb", 130), ratio_len) if ratio_len >= 130 * 6 else None
    r = R(c1, c2, ARXIV)
    if l2 is None:
        assert r.info["stopped_at"] == 2 and r.total == approx(0.5)
    else:
        assert r.info["l2"] == approx(l2)
        assert r.info["stopped_at"] is None  # 130 vs 130 unique: L3 ratio 1.0, full


# ---- level 3: unique-word ratio ---------------------------------------------------------------------
@pytest.mark.parametrize("u2,l3", [
    (12, None),                        # 1.2: stop
    (13, 0.0),                         # 1.3: ramp start, 0 but passes
    (15, 0.5 * (1.5 - 1.3) / 0.7),     # ramp
    (20, 0.5),                         # 2.0: full
    (40, 0.5),                         # no upper bound for TLDR
])
def test_l3_vocab_tldr(u2, l3):
    c2 = T((W("bb", u2) * 4)[:40], 250)  # always 40 words (repeats), length ratio 2.5
    r = R(C1, c2)
    assert r.info["vocab_ratio"] == approx(u2 / 10)
    if l3 is None:
        assert r.info["stopped_at"] == 3
        assert r.components == {"structure": 1.5, "coherence": 0.0, "consistency": 0.0, "grounding": 0.0,
                                "total": 1.5}
    else:
        assert r.info["stopped_at"] is None
        assert r.components["structure"] == approx(1.5 + l3)


@pytest.mark.parametrize("u2,l3", [
    (64, None),                        # 0.49: stop
    (65, 0.0),                         # 0.5: ramp start
    (78, 0.5 * (0.6 - 0.5) / 0.2),     # 0.6
    (91, 0.5), (169, 0.5),             # 0.7 and 1.3: full band edges
    (195, 0.5 * (1 - (1.5 - 1.3) / 0.4)),  # 1.5
    (221, 0.0),                        # 1.7: ramp end, 0 but passes
    (222, None),                       # 1.708: stop
])
def test_l3_vocab_arxiv(u2, l3):
    c1 = T(W("aa", 130), 1500)
    words2 = (W("bb", u2) * 2)[:max(u2, 130)]
    c2 = T(words2, 2250)  # length ratio 1.5: L2 full
    r = R(c1, c2, ARXIV)
    assert r.info["vocab_ratio"] == approx(u2 / 130)
    if l3 is None:
        assert r.info["stopped_at"] == 3 and r.components["structure"] == approx(1.5)
        assert r.total == approx(1.5)
    else:
        assert r.info["stopped_at"] is None and r.components["structure"] == approx(1.5 + l3)


def test_l3_stop_when_first_text_has_no_words():
    c1 = " ".join(["..."] * 8)  # 8 whitespace tokens, no \w+ words, 31 chars
    r = R(c1, T(W("bb", 10), 62))
    assert r.info["stopped_at"] == 3 and r.components["structure"] == approx(0.5 + 1.0)


# ---- level 4: transitions and Jaccard ---------------------------------------------------------------
def test_transition_score_formula():
    assert transition_score(0) == 0.0
    assert transition_score(1) == approx(0.4)
    assert transition_score(2) == approx(0.45)
    assert transition_score(12) == approx(0.95)
    assert transition_score(13) == approx(1.0) and transition_score(40) == approx(1.0)


def test_transition_categories_word_vs_substring():
    assert transition_categories("furthermore, it rained", "word") == {"elaboration"}
    assert transition_categories("for example a cat", "word") == {"examples"}
    assert transition_categories("however it rained", "word") == {"contrast", "concession"}
    assert transition_categories("she has a hat", "word") == set()  # no whole-word transition
    assert transition_categories("she has a hat") == {"time"}  # default, the authors' code: "as" inside "has"
    assert transition_categories("she also sang") == {"elaboration", "cause_effect"}  # "so" inside "also"


def test_l4_components():
    base2 = W("bb", 30)
    # no shared words, no transitions: L4 = 0
    r = R(C1, T(base2, 250))
    assert r.components["coherence"] == 0 and r.components["consistency"] == 0
    assert r.total == approx(2.0) and r.info["jaccard"] == 0
    # one transition category (elaboration): 0.4 * 0.4
    r = R(C1, T(base2 + ["furthermore"], 250))
    assert r.components["coherence"] == approx(0.16)
    # two categories from one word ("however": contrast + concession): 0.4 * 0.45
    r = R(C1, T(base2 + ["however"], 250))
    assert r.components["coherence"] == approx(0.18)
    # Jaccard 1 shared word of 10 + 30: J = 1/39 = 0.0256 < cap 0.03
    r = R(C1, T(["aa000"] + W("bb", 29), 250))
    assert r.info["jaccard"] == approx(1 / 39)
    assert r.components["consistency"] == approx(0.6 * (1 / 39) / 0.03)
    # J above the cap is capped: 2 shared -> 2/38 > 0.03
    r = R(C1, T(["aa000", "aa001"] + W("bb", 28), 250))
    assert r.components["consistency"] == approx(0.6)
    assert r.total == approx(0.5 + 1.0 + 0.5 + 0.0 + 0.6)


def test_jaccard_ignores_stopwords_and_both_empty_is_one():
    assert jaccard("the cat and the hat", "a cat with a bat") == approx(1 / 3)
    assert jaccard("the and", "of to") == 1.0


def test_arxiv_jaccard_cap():
    c1 = T(W("aa", 130), 1500)
    c2 = T(W("aa", 30) + W("bb", 100), 1500)  # J = 30 / 230
    r = R(c1, c2, ARXIV)
    assert r.info["jaccard"] == approx(30 / 230)
    assert r.components["consistency"] == approx(0.6 * (30 / 230) / 0.23)


# ---- the envs --------------------------------------------------------------------------------------------
def test_writing_env_local_file_reference_and_prompts():
    env = make_env({"name": "writing", "data": {"path": str(EXAMPLES / "tldr_posts.jsonl"), "eval_size": 5}})
    tr, ev = env.train_tasks(), env.tasks("dev") + env.tasks("test")
    assert len(tr) + len(ev) >= 40 and len(env.tasks("test")) == 5
    t = tr[0]
    assert t["text"].startswith("SUBREDDIT:") and not t["text"].endswith("TL;DR:")
    scores = [env.reward(x, env.reference_outputs(x)).total for x in tr + ev]
    assert min(scores) > 1.5 and sum(scores) / len(scores) > 2.3
    p1 = env.prompt(t, "agent1")[-1]["content"]
    p2 = env.prompt(t, "agent2", agent1="SHORT SUMMARY")[-1]["content"]
    assert "concise" in p1 and t["text"] in p1
    assert "detailed" in p2 and "SHORT SUMMARY" in p2
    assert "<part1>" in env.prompt(t, "single")[-1]["content"]
    assert env.joint_roles == ("agent1", "agent2") and env.max_reward == 3.0


def test_offline_writing_texts_give_200_held_out_and_rebuild_from_gsm8k(tmp_path):
    """The MAGRPO recipe's offline texts: 200 held out as the test split, a fifth of the rest (48:
    env.dev_size=100 capped) as the dev split, 192 to train on, disjoint; the file is what
    make_gsm8k_posts.py writes from GSM8K's train.jsonl (checked where that file is)."""
    env = make_env({"name": "writing", "data": {"path": str(EXAMPLES / "gsm8k_posts.jsonl"), "eval_size": 200}})
    tr, dev, ev = (env.tasks(s) for s in ("train", "dev", "test"))
    assert (len(tr), len(dev), len(ev)) == (192, 48, 200)
    texts = [{t["text"] for t in split} for split in (tr, dev, ev)]
    assert sum(map(len, texts)) == len(set().union(*texts))  # pairwise disjoint
    assert all(len(t["text"].split()) >= 60 for t in tr + ev)
    assert env.prompt(ev[0], "agent1")[-1]["content"].count(ev[0]["text"]) == 1
    gsm8k = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"
    if not gsm8k.exists():
        pytest.skip(f"{gsm8k} not on this machine: the rebuild is not checked")
    out = tmp_path / "posts.jsonl"
    subprocess.run([sys.executable, str(EXAMPLES / "make_gsm8k_posts.py"), str(gsm8k), "--out", str(out)], check=True)
    assert out.read_bytes() == (EXAMPLES / "gsm8k_posts.jsonl").read_bytes()


def test_single_agent_output_is_split_into_two_parts():
    env = make_env({"name": "writing", "data": {"path": str(EXAMPLES / "tldr_posts.jsonl")}})
    t = env.train_tasks()[0]
    ref = env.reference_outputs(t)
    joint = env.reward(t, ref).total
    single = env.reward(t, {"single": f"<part1>{ref['agent1']}</part1>\n<part2>{ref['agent2']}</part2>"}).total
    assert single == approx(joint)
    assert split_single("first para\n\nsecond para\n\nthird") == ("first para", "second para\n\nthird")


def test_writing_transition_feedback():
    env = make_env({"name": "writing", "data": {"path": str(EXAMPLES / "tldr_posts.jsonl")}})
    t = env.train_tasks()[0]
    outs = {"agent1": "too short", "agent2": "also short"}
    fb = env.transition(t, outs, env.reward(t, outs))
    assert set(fb) == {"agent1", "agent2"} and "8-256 words" in fb["agent1"]
    p = env.prompt(t, "agent1", previous="too short", feedback=fb["agent1"])[-1]["content"]
    assert "Here is the feedback" in p and "8-256 words" in p


def test_arxiv_env_local_file():
    env = make_env({"name": "arxiv_expansion", "data": {"path": str(EXAMPLES / "arxiv_abstracts.jsonl"), "eval_size": 1}})
    tasks = env.train_tasks() + env.tasks("dev") + env.tasks("test")
    assert len(tasks) == 6 and all(len(t["text"].split()) > 100 for t in tasks)
    assert "methodology" in env.prompt(tasks[0], "agent2")[-1]["content"]
    assert env.cfg.reward.jaccard_cap == 0.23 and env.cfg.reward.words_min == 128


def test_offline_error_names_the_bundled_file():
    env = make_env({"name": "writing"})
    with pytest.raises(ValueError, match="tldr_posts.jsonl"):
        env.train_tasks()


def test_bad_reward_option_is_a_config_error():
    from marl_llm.config import ConfigError
    with pytest.raises(ConfigError, match="transition_match"):
        make_env({"name": "writing", "reward": {"transition_match": "fuzzy"}})
    with pytest.raises(ConfigError, match="transition_text='agent1'.*'both'"):
        make_env({"name": "writing", "reward": {"transition_text": "agent1"}})
    with pytest.raises(ConfigError, match="grounding_weight=-0.5 must be >= 0"):
        make_env({"name": "writing", "reward": {"grounding_weight": -0.5}})


# ---- grounding: the pair against its source text ------------------------------------------------------
def test_grounding_is_the_share_of_the_pairs_content_words_in_the_source():
    assert content_words("The Cat's 3 cats, and THE dog!") == {"cat", "s", "cats", "dog"}
    assert grounding("the cat sat", "a dog ran", "A cat and a dog.") == approx(2 / 4)  # cat, dog of cat sat dog ran
    assert grounding("cat", "cat", "") == 0.0
    assert grounding("the and", "", "the and") == 0.0  # no content words: nothing grounded


def test_an_off_topic_pair_scores_low_on_grounding_and_lower_in_total_when_weighted():
    """Each post's reference pair scored on its own post (on topic) and on the next post (the same
    pair about something else: the same shape, so the four levels agree)."""
    posts = str(EXAMPLES / "tldr_posts.jsonl")
    env = make_env({"name": "writing", "data": {"path": posts}})
    weighted = make_env({"name": "writing", "data": {"path": posts}, "reward": {"grounding_weight": 1.0}})
    tasks = env.train_tasks()
    for task, other in zip(tasks, tasks[1:] + tasks[:1]):
        pair = env.reference_outputs(task)
        on, off = env.reward(task, pair), env.reward(other, pair)
        assert on.components["grounding"] > 0.35 and off.components["grounding"] < 0.15
        assert on.total == off.total  # weight 0 (default): the term does not change the total ...
        assert on.total == approx(sum(on.components[k] for k in ("structure", "coherence", "consistency")))
        w_on, w_off = weighted.reward(task, pair), weighted.reward(other, pair)
        assert w_on.total == approx(on.total + on.components["grounding"])  # ... weighted, it adds w x grounding
        assert w_off.total < w_on.total


def test_grounding_weight_raises_the_maximum():
    assert make_env({"name": "writing"}).max_reward == 3.0
    env = make_env({"name": "arxiv_expansion", "reward": {"grounding_weight": 0.5}})
    assert env.max_reward == env.max_reward_for(["agent1", "agent2"]) == 3.5
    text = "alpha beta gamma delta"
    r = env.reward({"text": text}, {"agent1": text, "agent2": text})
    assert r.components["grounding"] == 1.0 and r.total == 0.5  # L1 fails; the grounded half point stays
