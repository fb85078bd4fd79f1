"""Writing-reward parity cases: the writing envs' default reward equals the MAGRPO authors' code
on any text pair, TLDR and arXiv.

`tldr_combined_reward` and `arxiv_combined_reward` below transcribe the authors' published
functions (github.com/OpenMLRL/LLM_Collab_Writing, commit 7e59995e20251de8819bdf2a57d8296193cb2b03,
rewards/tldr_rewards.py and rewards/arxiv_rewards.py) with their prints removed and the helpers
and word lists the two files share written once; every comparison, constant and operation order
is theirs. Their training script (train_magrpo.py) passes the decoded completions to them as they
are. Compared on hand-picked edge cases and on seeded random pairs built from a word list rich
in transition words and their fragments.
"""
import functools
import random
import re

import pytest

from envs.base import make_env
from envs.writing import STOPWORDS as OUR_STOPWORDS
from envs.writing import TRANSITION_WORDS as OUR_TRANSITION_WORDS

# ---- the authors' code, transcribed ---------------------------------------------------------------
# fmt: off
STOPWORDS = {
    "a", "all", "also", "an", "and", "any", "are", "as", "at", "bad", "be", "been", "being",
    "both", "but", "by", "can", "could", "did", "do", "does", "each", "few", "first", "for",
    "from", "good", "great", "had", "has", "have", "he", "her", "here", "him", "his", "how",
    "i", "if", "in", "is", "it", "its", "just", "last", "left", "little", "long", "low", "many",
    "may", "me", "might", "more", "most", "much", "must", "my", "new", "no", "not", "now", "of",
    "old", "on", "only", "or", "other", "our", "own", "right", "same", "shall", "should", "so",
    "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they",
    "this", "those", "to", "too", "us", "very", "was", "we", "were", "what", "when", "where",
    "which", "who", "why", "will", "with", "would", "you", "your",
}
transition_words = {
    "elaboration": [
        "furthermore", "moreover", "additionally", "also", "besides", "in addition",
        "what is more", "not only", "as well as", "along with", "coupled with",
        "together with", "likewise", "similarly", "equally important", "by the same token",
        "in the same way", "correspondingly", "in like manner", "comparatively", "analogously",
    ],
    "examples": [
        "for example", "for instance", "specifically", "particularly", "namely", "such as",
        "including", "especially", "in particular", "to illustrate", "as an illustration",
        "case in point", "to demonstrate", "as evidence", "to exemplify", "notably",
        "markedly", "chiefly", "mainly", "primarily", "above all", "most importantly",
    ],
    "explanation": [
        "that is", "in other words", "to put it simply", "to clarify", "indeed", "in fact",
        "actually", "clearly", "obviously", "to put it another way", "to rephrase",
        "more precisely", "specifically speaking", "what this means is", "the point is",
        "essentially", "basically", "fundamentally", "at its core", "in essence", "simply put",
        "stated differently",
    ],
    "cause_effect": [
        "therefore", "thus", "consequently", "as a result", "hence", "accordingly",
        "for this reason", "due to this", "because of this", "so", "then", "thereby",
        "wherefore", "thence", "ergo", "as a consequence", "in consequence", "it follows that",
        "this leads to", "this results in", "this causes", "this brings about", "owing to",
        "on account of", "thanks to", "resulting from",
    ],
    "contrast": [
        "however", "nevertheless", "nonetheless", "on the other hand", "in contrast", "while",
        "whereas", "although", "even though", "despite this", "but", "yet", "still",
        "conversely", "on the contrary", "rather", "instead", "alternatively", "otherwise",
        "in opposition", "by contrast", "contrarily", "notwithstanding", "regardless",
        "all the same", "even so", "be that as it may", "in any case", "at any rate",
    ],
    "sequence": [
        "first", "second", "third", "next", "then", "after that", "finally", "lastly",
        "initially", "subsequently", "meanwhile", "to begin with", "to start with",
        "in the beginning", "at first", "at the outset", "primarily", "secondly", "thirdly",
        "following this", "afterward", "later", "later on", "in the meantime", "simultaneously",
        "concurrently", "at the same time", "in conclusion", "to conclude", "ultimately",
        "in the end", "to summarize", "in summary",
    ],
    "emphasis": [
        "indeed", "certainly", "surely", "undoubtedly", "without doubt", "definitely",
        "absolutely", "positively", "unquestionably", "indubitably", "of course", "naturally",
        "obviously", "clearly", "evidently", "manifestly", "undeniably", "admittedly",
        "granted", "to be sure", "in fact", "as a matter of fact", "notably", "significantly",
    ],
    "summary": [
        "in summary", "in conclusion", "to summarize", "to conclude", "in short", "in brief",
        "briefly", "to sum up", "on the whole", "overall", "all in all", "in essence",
        "essentially", "basically", "fundamentally", "in the final analysis", "after all",
        "ultimately", "in the end", "when all is said and done", "the bottom line is",
    ],
    "comparison": [
        "similarly", "likewise", "in the same way", "equally", "just as", "comparable to",
        "in comparison", "by the same token", "correspondingly", "in like manner",
        "along the same lines", "in similar fashion", "analogously", "by analogy",
        "just like", "much like", "as with",
    ],
    "concession": [
        "although", "though", "even though", "while", "whereas", "despite", "in spite of",
        "regardless of", "notwithstanding", "admittedly", "granted", "even if",
        "be that as it may", "nevertheless", "nonetheless", "however", "yet", "still",
        "all the same",
    ],
    "condition": [
        "if", "unless", "provided that", "assuming that", "supposing that", "in case",
        "in the event that", "on condition that", "given that", "as long as", "so long as",
        "only if", "even if", "whether or not", "should", "were", "had", "otherwise",
        "or else",
    ],
    "time": [
        "when", "while", "as", "after", "before", "until", "since", "during", "meanwhile",
        "simultaneously", "at the same time", "concurrently", "previously", "formerly",
        "earlier", "later", "afterward", "subsequently", "eventually", "finally", "recently",
        "lately", "nowadays", "currently", "presently", "immediately",
    ],
}
# fmt: on


def count_tokens(text):
    if not text or not text.strip():
        return 0
    return len(text.split())


def count_unique_words(text, exclude_stopwords=False):
    words = re.findall(r"\b\w+\b", text.lower())
    if exclude_stopwords:
        content_words = [word for word in words if word not in STOPWORDS]
    else:
        content_words = words
    return len(set(content_words))


def get_word_set(text, exclude_stopwords=True):
    words = re.findall(r"\b\w+\b", text.lower())
    if exclude_stopwords:
        content_words = [word for word in words if word not in STOPWORDS]
    else:
        content_words = words
    return set(content_words)


def calculate_jaccard_similarity(text1, text2):
    set1 = get_word_set(text1, exclude_stopwords=True)
    set2 = get_word_set(text2, exclude_stopwords=True)
    if len(set1) == 0 and len(set2) == 0:
        return 1.0
    intersection = len(set1.intersection(set2))
    union = len(set1.union(set2))
    if union == 0:
        return 0.0
    return intersection / union


def check_transition_words(text):
    text_lower = text.lower()
    categories_found = set()
    transition_words_found = []
    for category, words in transition_words.items():
        for word in words:
            if word in text_lower:
                categories_found.add(category)
                transition_words_found.append(word)
    return categories_found, transition_words_found


def transition_reward_scale_of(num_categories):
    transition_reward_scale = 0.0
    if num_categories > 0:
        transition_reward_scale = 0.4
        additional_categories = num_categories - 1
        additional_reward = min(additional_categories * 0.05, 0.6)
        transition_reward_scale += additional_reward
        transition_reward_scale = min(transition_reward_scale, 1.0)
    return transition_reward_scale


def tldr_combined_reward(completions1, completions2):
    rewards = []
    for c1, c2 in zip(completions1, completions2):
        reward = 0.0
        token_count1 = count_tokens(c1)
        token_count2 = count_tokens(c2)
        unique_words1 = count_unique_words(c1)
        unique_words2 = count_unique_words(c2)
        unique_words_ratio = unique_words2 / unique_words1 if unique_words1 > 0 else 0.0
        # LEVEL 1
        if 8 <= token_count1 <= 256 and 8 <= token_count2 <= 256:
            reward += 0.5
        else:
            rewards.append(reward)
            continue
        # LEVEL 2
        len1, len2 = len(c1), len(c2)
        if len1 == 0:
            rewards.append(reward)
            continue
        length_ratio = len2 / len1
        if 1.6 <= length_ratio <= 3.2:
            reward += 1.0
        elif 1.1 <= length_ratio < 1.6:
            reward += (length_ratio - 1.1) / (1.6 - 1.1)
        elif 3.2 < length_ratio <= 5.0:
            reward += 1.0 - ((length_ratio - 3.2) / (5.0 - 3.2))
        else:
            rewards.append(reward)
            continue
        # LEVEL 3
        if unique_words1 == 0:
            rewards.append(reward)
            continue
        elif unique_words_ratio >= 2.0:
            reward += 0.5
        elif 1.3 <= unique_words_ratio < 2.0:
            reward += ((unique_words_ratio - 1.3) / (2.0 - 1.3)) * 0.5
        else:
            rewards.append(reward)
            continue
        # LEVEL 4: transitions in completion 2 only
        categories_found, _ = check_transition_words(c2)
        transition_reward_scale = transition_reward_scale_of(len(categories_found))
        jaccard_score_raw = calculate_jaccard_similarity(c1, c2)
        jaccard_score_normalized = min(jaccard_score_raw, 0.03) / 0.03
        reward += 0.4 * transition_reward_scale + 0.6 * jaccard_score_normalized
        rewards.append(float(reward))
    return rewards


def arxiv_combined_reward(completions1, completions2):
    rewards = []
    for c1, c2 in zip(completions1, completions2):
        reward = 0.0
        token_count1 = count_tokens(c1)
        token_count2 = count_tokens(c2)
        unique_words1 = count_unique_words(c1)
        unique_words2 = count_unique_words(c2)
        unique_words_ratio = unique_words2 / unique_words1 if unique_words1 > 0 else 0.0
        # LEVEL 1
        if 128 <= token_count1 <= 256 and 128 <= token_count2 <= 256:
            reward += 0.5
        else:
            rewards.append(reward)
            continue
        # LEVEL 2
        len1, len2 = len(c1), len(c2)
        if len1 == 0:
            rewards.append(reward)
            continue
        length_ratio = len2 / len1
        if 1.3 <= length_ratio <= 1.6:
            reward += 1.0
        elif 0.8 <= length_ratio < 1.3:
            reward += (length_ratio - 0.8) / (1.3 - 0.8)
        elif 1.6 < length_ratio <= 2.0:
            reward += 1.0 - ((length_ratio - 1.6) / (2.0 - 1.6))
        else:
            rewards.append(reward)
            continue
        # LEVEL 3
        if unique_words1 == 0:
            rewards.append(reward)
            continue
        elif 0.7 <= unique_words_ratio <= 1.3:
            reward += 0.5
        elif 0.5 <= unique_words_ratio < 0.7:
            reward += 0.5 * (unique_words_ratio - 0.5) / (0.7 - 0.5)
        elif 1.3 < unique_words_ratio <= 1.7:
            reward += 0.5 * (1.0 - ((unique_words_ratio - 1.3) / (1.7 - 1.3)))
        else:
            rewards.append(reward)
            continue
        # LEVEL 4: transitions in the combined text
        categories_found, _ = check_transition_words(c1 + c2)
        transition_reward_scale = transition_reward_scale_of(len(categories_found))
        jaccard_score_raw = calculate_jaccard_similarity(c1, c2)
        jaccard_score_normalized = min(jaccard_score_raw, 0.23) / 0.23
        reward += 0.4 * transition_reward_scale + 0.6 * jaccard_score_normalized
        rewards.append(float(reward))
    return rewards


AUTHORS = {"writing": tldr_combined_reward, "arxiv_expansion": arxiv_combined_reward}
SOURCE = {"text": "A post about something, with its own words."}


@functools.lru_cache(maxsize=None)
def env_for(env_name, reward_items=()):
    return make_env({"name": env_name, "reward": dict(reward_items)})


def ours(env_name, c1, c2, **reward):
    return env_for(env_name, tuple(sorted(reward.items()))).reward(SOURCE, {"agent1": c1, "agent2": c2})


def theirs(env_name, c1, c2):
    return AUTHORS[env_name]([c1], [c2])[0]


# ---- hand-picked cases ------------------------------------------------------------------------------
def words(n, stem="word"):
    return " ".join(f"{stem}{i}" for i in range(n))


def repeated(n_unique, n_words, stem):
    """`n_words` whitespace words cycling through `n_unique` distinct ones."""
    return " ".join(f"{stem}{i % n_unique}" for i in range(n_words))


def pad(text, length):
    """`text` followed by dots up to `length` characters (dots add no word and no transition)."""
    assert len(text) <= length
    return text + "." * (length - len(text))


def tldr_cases():
    c1 = pad(words(10, "a"), 100)  # 10 words, 10 unique, 100 characters
    c2 = words(25, "b")  # 25 unique words: L3 full
    short, z = words(10, "a"), words(25, "z")  # L4 cases: length ratio ~3, vocabulary ratio 2.6
    return [
        ("", ""), ("one", "two"), (words(8), ""), (words(7), words(30)),
        (words(8), words(256, "w")), (words(8), words(257, "w")),  # L1 edges
        *[(c1, pad(c2, n)) for n in (109, 110, 135, 160, 320, 410, 500, 501)],  # L2 band and ramp edges
        ("\n" + words(10) + "  ", "  " + words(30, "long") + "\n\n"),  # whitespace counts in L2's lengths
        (c1, pad(words(12, "a"), 200)),  # L3: vocabulary ratio 1.2 stops
        (c1, pad(words(13, "b"), 200)), (c1, pad(words(15, "b"), 200)),  # L3 ramp start, ramp
        ("... ... ... ... ... ... ... ...", words(12)),  # no \w words in c1: L3 stops
        (short, z + " also"), (short, z + " ALSO, However!"),  # transitions, case, punctuation
        (short, z + " she has a hat"), (short, z + " whenever butter"),  # "as", "when", "but" inside words
        (short, z + " for  example"),  # two spaces: not the phrase "for example"
        (short, z + " a1 a2 a3"),  # Jaccard above the cap
        ("Café naïve résumé " + words(7), "Café " + words(30, "ü")),  # unicode \w
        ("the of and to in is it at", " ".join(sorted(STOPWORDS)[:24])),  # stop-words only: J = 1
    ]


def arxiv_cases():
    c1 = pad(words(130, "a"), 1000)  # 130 words, 1000 characters
    c2 = words(130, "b")
    return [
        (words(127), words(130, "b")), (c1, words(257, "b")), (c1, c1),
        *[(c1, pad(c2, n)) for n in (790, 800, 1000, 1300, 1500, 1600, 1800, 2000, 2010)],  # L2 edges
        (c1, pad(repeated(64, 130, "b"), 1000)), (c1, pad(repeated(65, 130, "b"), 1000)),  # L3: 0.49 stops, 0.5 ramp
        (c1, pad(words(200, "b"), 1500)), (c1, pad(words(222, "b"), 1500)),  # L3: 1.54 ramp, 1.71 stops
        (words(130, "a") + " the", "n " + words(130, "bbbb")),  # "then" only where the texts join (c1 + c2)
        (words(130, "a") + " however", words(130, "bbbb")),  # a transition in agent 1's text only
        (words(130, "a") + " however, therefore", words(130, "bbbb") + " Moreover"),
    ]


@pytest.mark.parametrize("c1,c2", tldr_cases())
def test_tldr_edge_cases_match_the_authors(c1, c2):
    assert ours("writing", c1, c2).total == pytest.approx(theirs("writing", c1, c2), abs=1e-9)


@pytest.mark.parametrize("c1,c2", arxiv_cases())
def test_arxiv_edge_cases_match_the_authors(c1, c2):
    assert ours("arxiv_expansion", c1, c2).total == pytest.approx(theirs("arxiv_expansion", c1, c2), abs=1e-9)


def test_word_lists_are_the_authors():
    assert OUR_STOPWORDS == STOPWORDS
    assert {k: list(v) for k, v in OUR_TRANSITION_WORDS.items()} == transition_words


def test_arxiv_length_band_is_the_code_not_the_docstring():
    """Ratio 1.5 is full in the authors' code (1.3-1.6); their docstring's 1.0-1.3 band would ramp it."""
    r = ours("arxiv_expansion", pad(words(130, "a"), 1000), pad(words(130, "b"), 1500))
    assert r.info["length_ratio"] == 1.5 and r.info["l2"] == 1.0


def test_arxiv_transitions_span_both_texts_and_word_mode_is_stricter():
    c1, c2 = words(130, "a") + " the", "n " + words(130, "bbbb")  # "then" exists only in c1 + c2
    assert ours("arxiv_expansion", c1, c2).info["transition_categories"] == ["cause_effect", "sequence"]
    assert ours("arxiv_expansion", c1, c2, transition_text="agent2").info["transition_categories"] == []
    c2 = words(25, "z") + " she has a hat"
    assert "time" in ours("writing", words(10), c2).info["transition_categories"]  # "as" in "has"
    assert ours("writing", words(10), c2, transition_match="word").info["transition_categories"] == []


# ---- seeded random pairs ----------------------------------------------------------------------------
VOCAB = (
    [f"topic{i}" for i in range(40)] + sorted(STOPWORDS)[:40]
    + ["however", "Therefore,", "also", "so", "then", "as", "has", "thesis", "whereas", "ALSO", "in", "case",
       "for", "example", "in fact", "still", "yet", "first", "Finally.", "eventually", "hence", "the", "n",
       "reason", "although", "despite", "mainly", "don't", "e.g.", "(notably)", "x-ray", "42", "—", "...", "naïve"]
)


def random_text(rng, n_words, vocab_size):
    pool = VOCAB[:vocab_size] if rng.random() < 0.5 else rng.sample(VOCAB, vocab_size)
    sep = rng.choice([" ", " ", " ", "\n", "  "])
    text = sep.join(rng.choice(pool) for _ in range(n_words))
    return rng.choice(["", " ", "\n"]) + text + rng.choice(["", ".", " ", "\n"])


def random_pairs(seed, n1_range, scale_range, n):
    rng = random.Random(seed)
    pairs = []
    for _ in range(n):
        n1 = rng.randint(*n1_range)
        n2 = max(1, round(n1 * rng.uniform(*scale_range)))
        pairs.append((random_text(rng, n1, rng.randint(3, 60)), random_text(rng, n2, rng.randint(3, len(VOCAB)))))
    return pairs


@pytest.mark.parametrize("env_name,n1_range,scale_range", [
    ("writing", (4, 70), (0.8, 6.0)),
    ("arxiv_expansion", (124, 200), (0.75, 1.5)),
])
def test_random_pairs_match_the_authors(env_name, n1_range, scale_range):
    pairs = random_pairs(0, n1_range, scale_range, 400)
    stops, word_mode_differs = set(), 0
    for c1, c2 in pairs:
        r = ours(env_name, c1, c2)
        assert r.total == pytest.approx(theirs(env_name, c1, c2), abs=1e-9), (c1, c2)
        stops.add(r.info["stopped_at"])
        word_mode_differs += ours(env_name, c1, c2, transition_match="word").total != r.total
    assert stops == {1, 2, 3, None}  # the pairs reach every level's stop and the full reward
    assert word_mode_differs > 0  # ... and the substring quirk matters on some of them
