"""Two-agent writing tasks with MAGRPO's four-level reward (the MAGRPO paper's TLDR / arXiv rewards).

- ``writing``: TLDR summaries of Reddit-style posts (Hub ``trl-lib/tldr``: columns prompt,
  completion). Agent 1 writes a concise summary, agent 2 a detailed one.
- ``arxiv_expansion``: expand an arXiv abstract into an introduction (Hub
  ``OpenMLRL/arXiv_abstract``, column abstract_text — the MAGRPO authors' set). Agent 1 writes
  background and motivation, agent 2 methodology and implications.

Offline, use the small original files shipped in ``examples/data`` (tldr_posts.jsonl,
arxiv_abstracts.jsonl) with ``env.data.path=...``.

Roles and context: ``agent1``; ``agent2`` (context ``agent1``: agent 1's output, for the
sequential baseline); ``single`` (one model writes both parts, in <part1>/<part2> tags). Every
role accepts ``feedback`` + ``previous`` for a revision turn. `reward` takes outputs
{"agent1", "agent2"} or {"single"}.

Reward (max 3.0 + grounding_weight). By default it equals the MAGRPO authors' code
(OpenMLRL/LLM_Collab_Writing, rewards/tldr_rewards.py and rewards/arxiv_rewards.py) on any text
pair, quirks included; tests/envs/test_writing_parity.py pins this. The texts are scored as the
agents wrote them (not stripped). Levels are scored in order; failing a level stops scoring:
L1 structure +0.5 if both texts have a whitespace word count in [words_min, words_max];
L2 coordination 0..1 from len(c2)/len(c1) in characters: 1 on [len_full], linear ramps up on
   [len_ramp[0], len_full[0]) and down on (len_full[1], len_ramp[1]]; outside [len_ramp] stops
   (TLDR 1.6-3.2 full, 1.1-5.0 ramp; arXiv 1.3-1.6 full, 0.8-2.0 ramp);
L3 vocabulary 0..0.5 from unique(c2)/unique(c1) (unique lower-cased \\w+ words, stop-words kept as
   in the authors' code), same shape with vocab_full / vocab_ramp (an upper bound of null = no
   bound); outside the ramps stops;
L4 style 0..1 = 0.4 * transition score + 0.6 * min(J, cap)/cap, J = Jaccard similarity of the
   two word sets without stop-words (both empty: J = 1); transition score = 0 if no category of
   transition words appears, else min(0.4 + min(0.05 * (categories - 1), 0.6), 1.0). The text
   searched is agent 2's (TLDR) or c1 + c2 joined with no separator (arXiv: `transition_text`).
   `transition_match=substring` (default, the authors' code) finds a phrase anywhere in the
   lower-cased text, so "so" counts inside "also" and "as" inside "has"; `word` counts whole
   words only.
A ratio exactly on a ramp's outer end scores 0 for that level but passes it (as in the authors'
code). Grounding (not in the authors' code, which never reads the source): the share of the
pair's distinct content words (lower-cased letter runs minus the stop-words) that appear in the
task's source text, 0..1; it adds grounding_weight * grounding to the total (default weight 0)
and is always logged. Components: structure (L1+L2+L3), coherence (0.4 x transition),
consistency (0.6 x Jaccard part), grounding (the unweighted share), total.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from envs.base import DataConfig, Env, EnvConfig, Reward, fill
from envs.qa import tag_contents
from marl_llm.config import check, check_choice, check_positive
from marl_llm.data import DataError, load_splits
from marl_llm.registry import register_env

EXAMPLES = Path(__file__).resolve().parent.parent / "examples" / "data"

# fmt: off
STOPWORDS = frozenset({
    "a", "all", "also", "an", "and", "any", "are", "as", "at", "bad", "be", "been", "being",
    "both", "but", "by", "can", "could", "did", "do", "does", "each", "few", "first", "for",
    "from", "good", "great", "had", "has", "have", "he", "her", "here", "him", "his", "how",
    "i", "if", "in", "is", "it", "its", "just", "last", "left", "little", "long", "low", "many",
    "may", "me", "might", "more", "most", "much", "must", "my", "new", "no", "not", "now", "of",
    "old", "on", "only", "or", "other", "our", "own", "right", "same", "shall", "should", "so",
    "some", "such", "than", "that", "the", "their", "them", "then", "there", "these", "they",
    "this", "those", "to", "too", "us", "very", "was", "we", "were", "what", "when", "where",
    "which", "who", "why", "will", "with", "would", "you", "your",
})

TRANSITION_WORDS: dict[str, tuple[str, ...]] = {
    "elaboration": ("furthermore", "moreover", "additionally", "also", "besides", "in addition",
                    "what is more", "not only", "as well as", "along with", "coupled with",
                    "together with", "likewise", "similarly", "equally important", "by the same token",
                    "in the same way", "correspondingly", "in like manner", "comparatively", "analogously"),
    "examples": ("for example", "for instance", "specifically", "particularly", "namely", "such as",
                 "including", "especially", "in particular", "to illustrate", "as an illustration",
                 "case in point", "to demonstrate", "as evidence", "to exemplify", "notably",
                 "markedly", "chiefly", "mainly", "primarily", "above all", "most importantly"),
    "explanation": ("that is", "in other words", "to put it simply", "to clarify", "indeed", "in fact",
                    "actually", "clearly", "obviously", "to put it another way", "to rephrase",
                    "more precisely", "specifically speaking", "what this means is", "the point is",
                    "essentially", "basically", "fundamentally", "at its core", "in essence", "simply put",
                    "stated differently"),
    "cause_effect": ("therefore", "thus", "consequently", "as a result", "hence", "accordingly",
                     "for this reason", "due to this", "because of this", "so", "then", "thereby",
                     "wherefore", "thence", "ergo", "as a consequence", "in consequence", "it follows that",
                     "this leads to", "this results in", "this causes", "this brings about", "owing to",
                     "on account of", "thanks to", "resulting from"),
    "contrast": ("however", "nevertheless", "nonetheless", "on the other hand", "in contrast", "while",
                 "whereas", "although", "even though", "despite this", "but", "yet", "still",
                 "conversely", "on the contrary", "rather", "instead", "alternatively", "otherwise",
                 "in opposition", "by contrast", "contrarily", "notwithstanding", "regardless",
                 "all the same", "even so", "be that as it may", "in any case", "at any rate"),
    "sequence": ("first", "second", "third", "next", "then", "after that", "finally", "lastly",
                 "initially", "subsequently", "meanwhile", "to begin with", "to start with",
                 "in the beginning", "at first", "at the outset", "primarily", "secondly", "thirdly",
                 "following this", "afterward", "later", "later on", "in the meantime", "simultaneously",
                 "concurrently", "at the same time", "in conclusion", "to conclude", "ultimately",
                 "in the end", "to summarize", "in summary"),
    "emphasis": ("indeed", "certainly", "surely", "undoubtedly", "without doubt", "definitely",
                 "absolutely", "positively", "unquestionably", "indubitably", "of course", "naturally",
                 "obviously", "clearly", "evidently", "manifestly", "undeniably", "admittedly",
                 "granted", "to be sure", "in fact", "as a matter of fact", "notably", "significantly"),
    "summary": ("in summary", "in conclusion", "to summarize", "to conclude", "in short", "in brief",
                "briefly", "to sum up", "on the whole", "overall", "all in all", "in essence",
                "essentially", "basically", "fundamentally", "in the final analysis", "after all",
                "ultimately", "in the end", "when all is said and done", "the bottom line is"),
    "comparison": ("similarly", "likewise", "in the same way", "equally", "just as", "comparable to",
                   "in comparison", "by the same token", "correspondingly", "in like manner",
                   "along the same lines", "in similar fashion", "analogously", "by analogy",
                   "just like", "much like", "as with"),
    "concession": ("although", "though", "even though", "while", "whereas", "despite", "in spite of",
                   "regardless of", "notwithstanding", "admittedly", "granted", "even if",
                   "be that as it may", "nevertheless", "nonetheless", "however", "yet", "still",
                   "all the same"),
    "condition": ("if", "unless", "provided that", "assuming that", "supposing that", "in case",
                  "in the event that", "on condition that", "given that", "as long as", "so long as",
                  "only if", "even if", "whether or not", "should", "were", "had", "otherwise",
                  "or else"),
    "time": ("when", "while", "as", "after", "before", "until", "since", "during", "meanwhile",
             "simultaneously", "at the same time", "concurrently", "previously", "formerly",
             "earlier", "later", "afterward", "subsequently", "eventually", "finally", "recently",
             "lately", "nowadays", "currently", "presently", "immediately"),
}
# fmt: on
_WORD_RE = re.compile(r"\b\w+\b")
_LETTERS_RE = re.compile(r"[^\W\d_]+")  # runs of letters: the grounding term's words
_PHRASE_RE = {p: re.compile(rf"(?<!\w){re.escape(p)}(?!\w)") for ps in TRANSITION_WORDS.values() for p in ps}


# ---- the reward (pure functions, pinned by tests) -----------------------------------------------------
@dataclass
class WritingRewardConfig:
    words_min: int = 8
    words_max: int = 256
    len_full: list[float] = field(default_factory=lambda: [1.6, 3.2])
    len_ramp: list[float] = field(default_factory=lambda: [1.1, 5.0])
    vocab_full: list[Optional[float]] = field(default_factory=lambda: [2.0, None])
    vocab_ramp: list[Optional[float]] = field(default_factory=lambda: [1.3, None])
    jaccard_cap: float = 0.03
    #: "substring": a transition phrase counts anywhere in the lower-cased text (the MAGRPO
    #: authors' code: "so" matches inside "also", "as" inside "has"); "word": only as whole words
    transition_match: str = "substring"
    #: the text L4 searches for transition words: "agent2" (TLDR) or "both" (arXiv: c1 + c2
    #: joined with no separator, as the authors' code)
    transition_text: str = "agent2"
    #: drop stop-words before counting L3's unique words (the authors' code keeps them)
    vocab_exclude_stopwords: bool = False
    #: weight of `grounding` (share of the pair's content words found in the source text, 0..1)
    #: in the total; 0 keeps the authors' reward, and the component is logged at any weight
    grounding_weight: float = 0.0

    def __post_init__(self):
        check_choice("env.reward.transition_match", self.transition_match, ("substring", "word"))
        check_choice("env.reward.transition_text", self.transition_text, ("agent2", "both"))
        for key in ("len_full", "len_ramp", "vocab_full", "vocab_ramp"):
            check(len(getattr(self, key)) == 2, f"env.reward.{key}", list(getattr(self, key)), "must be [low, high]")
        check_positive("env.reward.jaccard_cap", self.jaccard_cap)
        check_positive("env.reward.grounding_weight", self.grounding_weight, allow_zero=True)


TLDR_REWARD = dict(words_min=8, words_max=256, len_full=[1.6, 3.2], len_ramp=[1.1, 5.0],
                   vocab_full=[2.0, None], vocab_ramp=[1.3, None], jaccard_cap=0.03)
# the authors' arXiv code: 1.3-1.6 full / 0.8-2.0 ramp (its docstring's 1.0-1.3 / 0.8-1.5 is stale)
ARXIV_REWARD = dict(words_min=128, words_max=256, len_full=[1.3, 1.6], len_ramp=[0.8, 2.0],
                    vocab_full=[0.7, 1.3], vocab_ramp=[0.5, 1.7], jaccard_cap=0.23, transition_text="both")


def word_count(text: str) -> int:
    return len(text.split()) if text and text.strip() else 0


def words(text: str, drop_stopwords: bool = False) -> set[str]:
    ws = _WORD_RE.findall((text or "").lower())
    return {w for w in ws if not (drop_stopwords and w in STOPWORDS)}


def jaccard(a: str, b: str) -> float:
    s1, s2 = words(a, True), words(b, True)
    if not s1 and not s2:
        return 1.0
    union = s1 | s2
    return len(s1 & s2) / len(union) if union else 0.0


def content_words(text: str) -> set[str]:
    """Lower-cased runs of letters, minus the stop-words."""
    return set(_LETTERS_RE.findall((text or "").lower())) - STOPWORDS


def grounding(c1: str, c2: str, source: str) -> float:
    """Share of the pair's distinct content words that appear in the source text (0 if it has none)."""
    pair = content_words(c1) | content_words(c2)
    return len(pair & content_words(source)) / len(pair) if pair else 0.0


def transition_categories(text: str, mode: str = "substring") -> set[str]:
    low = (text or "").lower()
    found = set()
    for cat, phrases in TRANSITION_WORDS.items():
        for p in phrases:
            if (p in low) if mode == "substring" else bool(_PHRASE_RE[p].search(low)):
                found.add(cat)
                break
    return found


def transition_score(n_categories: int) -> float:
    if n_categories <= 0:
        return 0.0
    return min(0.4 + min(0.05 * (n_categories - 1), 0.6), 1.0)


def ramp(r: float, full: list, ramp_: list) -> Optional[float]:
    """1 on [full], linear ramps to 0 at the ramp ends, None (= stop) outside [ramp]."""
    f_lo, f_hi = full[0], (math.inf if full[1] is None else full[1])
    r_lo, r_hi = ramp_[0], (math.inf if ramp_[1] is None else ramp_[1])
    if f_lo <= r <= f_hi:
        return 1.0
    if r_lo <= r < f_lo:
        return (r - r_lo) / (f_lo - r_lo)
    if f_hi < r <= r_hi:
        return 1.0 - (r - f_hi) / (r_hi - f_hi)
    return None


def writing_reward(c1: str, c2: str, cfg: WritingRewardConfig, source: str = "") -> Reward:
    """The four levels on texts (c1, c2) as written, plus grounding in `source` (the task's text)."""
    c1, c2 = c1 or "", c2 or ""
    info: dict[str, Any] = {"words1": word_count(c1), "words2": word_count(c2), "stopped_at": None}
    comps = {"structure": 0.0, "coherence": 0.0, "consistency": 0.0,
             "grounding": grounding(c1, c2, source), "total": 0.0}

    def done(level):
        info["stopped_at"] = level
        comps["total"] = (comps["structure"] + comps["coherence"] + comps["consistency"]
                          + cfg.grounding_weight * comps["grounding"])
        return Reward(comps["total"], dict(comps), info)

    # L1 structure
    if not (cfg.words_min <= info["words1"] <= cfg.words_max and cfg.words_min <= info["words2"] <= cfg.words_max):
        return done(1)
    comps["structure"] += 0.5
    # L2 coordination: character-length ratio
    if len(c1) == 0:
        return done(2)
    info["length_ratio"] = len(c2) / len(c1)
    l2 = ramp(info["length_ratio"], cfg.len_full, cfg.len_ramp)
    info["l2"] = l2
    if l2 is None:
        return done(2)
    comps["structure"] += l2
    # L3 vocabulary: unique-word ratio
    u1 = len(words(c1, cfg.vocab_exclude_stopwords))
    u2 = len(words(c2, cfg.vocab_exclude_stopwords))
    if u1 == 0:
        return done(3)
    info["vocab_ratio"] = u2 / u1
    l3 = ramp(info["vocab_ratio"], cfg.vocab_full, cfg.vocab_ramp)
    info["l3"] = None if l3 is None else 0.5 * l3
    if l3 is None:
        return done(3)
    comps["structure"] += 0.5 * l3
    # L4 style
    cats = transition_categories(c2 if cfg.transition_text == "agent2" else c1 + c2, cfg.transition_match)
    info["transition_categories"] = sorted(cats)
    info["jaccard"] = jaccard(c1, c2)
    comps["coherence"] = 0.4 * transition_score(len(cats))
    comps["consistency"] = 0.6 * min(info["jaccard"], cfg.jaccard_cap) / cfg.jaccard_cap
    return done(None)


# ---- prompts -----------------------------------------------------------------------------------------
TLDR_PROMPTS = {
    "agent1": ("Write a concise summary of this post in one or two sentences.\n\n{text}\n\n"
               "Another writer will give a detailed summary, so keep yours short and factual."),
    "agent2": ("Write a detailed summary of this post, about two to three times longer than a one-sentence "
               "summary. Use varied vocabulary and a few transition words (for example, however, therefore) "
               "so it reads smoothly.\n\n{text}"),
    "agent2_context": "\n\nYour partner's concise summary:\n{agent1}\n\nAdd detail to it instead of repeating it.",
    "single": ("Write two summaries of this post. First a concise one- or two-sentence summary inside "
               "<part1></part1>, then a detailed summary two to three times longer inside <part2></part2>, "
               "with varied vocabulary and a few transition words.\n\n{text}"),
    "feedback": "\n\nYour previous response:\n{previous}\n\nHere is the feedback:\n{feedback}\n\nRevise your response.",
}
ARXIV_PROMPTS = {
    "agent1": ("Based on the following scientific abstract, write the background and motivation part of an "
               "introduction section (about 150 to 200 words). Another writer covers the methodology and "
               "implications; do not repeat them.\n\nAbstract:\n{text}"),
    "agent2": ("Based on the following scientific abstract, write the methodology and implications part of an "
               "introduction section (about 150 to 200 words). Another writer covers the background and "
               "motivation; do not repeat them.\n\nAbstract:\n{text}"),
    "agent2_context": "\n\nYour partner's background and motivation part:\n{agent1}\n\nContinue from it without repeating it.",
    "single": ("Based on the following scientific abstract, write an introduction section in two parts of about "
               "150 to 200 words each: background and motivation inside <part1></part1>, then methodology and "
               "implications inside <part2></part2>.\n\nAbstract:\n{text}"),
    "feedback": TLDR_PROMPTS["feedback"],
}


def _tldr_data() -> DataConfig:
    return DataConfig(hub_id="trl-lib/tldr", split="train", eval_split="validation",
                      fields={"text": "prompt", "reference": "completion"})


def _arxiv_data() -> DataConfig:
    return DataConfig(hub_id="OpenMLRL/arXiv_abstract", split="train", eval_split="val",
                      fields={"text": "abstract_text"})


@dataclass
class WritingConfig(EnvConfig):
    name: str = "writing"
    data: DataConfig = field(default_factory=_tldr_data)
    system_prompt: Optional[str] = "You are a skilled writer who follows length and style instructions closely."
    reward: WritingRewardConfig = field(default_factory=lambda: WritingRewardConfig(**TLDR_REWARD))
    prompts: dict[str, str] = field(default_factory=lambda: dict(TLDR_PROMPTS))
    #: drop a trailing "TL;DR:" cue from the source text before building prompts
    strip_tldr_cue: bool = True
    #: the bundled offline file named in the error when the Hub is unreachable
    offline_file: str = "tldr_posts.jsonl"


@dataclass
class ArxivConfig(WritingConfig):
    name: str = "arxiv_expansion"
    data: DataConfig = field(default_factory=_arxiv_data)
    reward: WritingRewardConfig = field(default_factory=lambda: WritingRewardConfig(**ARXIV_REWARD))
    prompts: dict[str, str] = field(default_factory=lambda: dict(ARXIV_PROMPTS))
    offline_file: str = "arxiv_abstracts.jsonl"
    strip_tldr_cue: bool = False  # abstracts carry no TL;DR cue


def split_single(text: str) -> tuple[str, str]:
    """A single agent's two parts: <part1>/<part2> tags, else first paragraph / the rest."""
    p1, p2 = tag_contents(text, "part1"), tag_contents(text, "part2")
    if p1 or p2:
        return (p1[-1] if p1 else ""), (p2[-1] if p2 else "")
    paras = [p.strip() for p in re.split(r"\n\s*\n", (text or "").strip()) if p.strip()]
    if not paras:
        return "", ""
    return paras[0], "\n\n".join(paras[1:])


@register_env("writing")
class WritingEnv(Env):
    Config = WritingConfig
    roles = ("agent1", "agent2", "single")
    joint_roles = ("agent1", "agent2")
    max_reward = 3.0
    kind = "tldr"
    default_prompts = TLDR_PROMPTS
    columns = ("text",)

    def __init__(self, cfg: WritingConfig, seed: int = 0):
        super().__init__(cfg, seed)
        self.max_reward = 3.0 + float(cfg.reward.grounding_weight)

    def _load(self):
        try:
            s = load_splits(self.cfg.data, default_fields={k: k for k in self.columns}, required=self.columns,
                            seed=self.seed, id_prefix=self.cfg.name)
        except DataError as e:
            local = EXAMPLES / self.cfg.offline_file
            if self.cfg.data.path is None and local.exists():
                raise DataError(f"{e} A small offline file ships with marl_llm: env.data.path={local}") from e
            raise
        return [self._normalise(t) for t in s.train], [self._normalise(t) for t in s.eval]

    def _normalise(self, t):
        t = dict(t)
        text = t["text"]
        if isinstance(text, list):  # arXiv abstract_text as a list of sentences
            text = " ".join(str(x) for x in text)
        text = re.sub(r"</?S>", "", str(text)).strip()
        if self.cfg.strip_tldr_cue:
            text = re.sub(r"\s*TL;DR:\s*$", "", text)
        t["text"] = text
        return t


    def prompt(self, task, role: str = "single", **context):
        if role not in self.roles:
            raise ValueError(f"{type(self).__name__} has no role {role!r}; roles: {list(self.roles)}")
        pr = {**self.default_prompts, **(self.cfg.prompts or {})}
        user = fill(pr[role], text=task["text"])
        if role == "agent2" and context.get("agent1"):
            user += fill(pr["agent2_context"], agent1=str(context["agent1"]).strip())
        if context.get("feedback"):
            user += fill(pr["feedback"], previous=context.get("previous") or "(none)", feedback=context["feedback"])
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    def parts(self, outputs: dict[str, str]) -> tuple[str, str]:
        if "agent1" in outputs or "agent2" in outputs:
            return outputs.get("agent1") or "", outputs.get("agent2") or ""
        if "single" in outputs:
            return split_single(outputs["single"] or "")
        raise ValueError(f"writing reward needs outputs 'agent1' and 'agent2' (or 'single'); got {sorted(outputs)}")

    def reward(self, task, outputs):
        c1, c2 = self.parts(outputs)
        return writing_reward(c1, c2, self.cfg.reward, source=task["text"])

    def reference_outputs(self, task):
        """TLDR: the dataset's summary as agent 1 and, for agent 2, a `detailed` column if the data
        has one (the bundled file does), else the post itself. arXiv: `background` / `method`
        columns if present, else the abstract's two halves (a weak baseline, not a gold answer)."""
        if self.kind == "tldr":
            a1 = str(task.get("reference") or "").strip()
            a2 = str(task.get("detailed") or task["text"]).strip()
            return {"agent1": a1, "agent2": a2}
        if task.get("background") and task.get("method"):
            return {"agent1": task["background"], "agent2": task["method"]}
        sents = re.split(r"(?<=[.!?])\s+", task["text"])
        h = max(1, len(sents) // 2)
        return {"agent1": " ".join(sents[:h]), "agent2": " ".join(sents[h:])}

    def transition(self, task, outputs, reward):
        """Level diagnostics as feedback for a revision turn (same text for both agents)."""
        c1, c2 = self.parts(outputs)
        info = reward.info or writing_reward(c1, c2, self.cfg.reward).info
        rc = self.cfg.reward
        notes = []
        if info.get("stopped_at") == 1:
            notes.append(f"Both parts must have {rc.words_min}-{rc.words_max} words; part 1 has "
                         f"{info['words1']} and part 2 has {info['words2']}.")
        elif info.get("stopped_at") == 2 or (info.get("l2") is not None and info["l2"] < 1):
            notes.append(f"Part 2 should be {rc.len_full[0]}-{rc.len_full[1]} times as long as part 1 (characters); "
                         f"it is {info.get('length_ratio', 0):.2f} times.")
        if info.get("stopped_at") == 3 or (info.get("l3") is not None and info["l3"] < 0.5):
            hi = "" if rc.vocab_full[1] is None else f"-{rc.vocab_full[1]}"
            notes.append(f"Part 2 should use {rc.vocab_full[0]}{hi} times as many distinct words as part 1; "
                         f"it uses {info.get('vocab_ratio', 0):.2f} times.")
        if info.get("stopped_at") is None:
            if len(info.get("transition_categories", [])) < 3:
                where = "part 2" if rc.transition_text == "agent2" else "the two parts"
                notes.append(f"Use transition words of several kinds in {where} (e.g. however, for example, therefore).")
            if info.get("jaccard", 0) < rc.jaccard_cap:
                notes.append("Keep the two parts about the same key points (share some content words).")
        text = " ".join(notes) or "Both parts meet every requirement."
        keys = [k for k in outputs if k in self.roles] or ["agent1", "agent2"]
        return {k: text for k in keys}


@register_env("arxiv_expansion")
class ArxivExpansionEnv(WritingEnv):
    Config = ArxivConfig
    kind = "arxiv"
    default_prompts = ARXIV_PROMPTS
