"""The nouns every part of marl_llm speaks: requests, completions, turns, episodes, samples.

Everything here is plain data (dataclasses of lists and scalars) so it pickles across Ray,
serialises to JSON for the trajectory buffer, and carries no engine objects.
"""
from __future__ import annotations

import itertools
import uuid
from dataclasses import asdict, dataclass, field
from typing import Any


def new_id() -> str:
    return uuid.uuid4().hex[:16]


@dataclass
class SamplingConfig:
    """Per-request sampling settings; the same keys for every rollout backend."""

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    max_tokens: int = 64
    seed: int | None = None
    stop: list[str] | None = None


@dataclass
class GenerationRequest:
    """One prompt for one policy: either chat messages (templated by the worker) or token ids."""

    messages: list[dict[str, str]] | None = None
    prompt_ids: list[int] | None = None
    sampling: SamplingConfig = field(default_factory=SamplingConfig)

    def __post_init__(self):
        if (self.messages is None) == (self.prompt_ids is None):
            raise ValueError("GenerationRequest needs exactly one of `messages` or `prompt_ids`")


@dataclass
class Completion:
    """One sampled continuation, token-in/token-out: the learner trains on exactly these ids."""

    prompt_ids: list[int]
    completion_ids: list[int]
    logprobs: list[float]
    text: str
    finish_reason: str = "stop"
    version: int = 0  # the weights that generated it: the rollout worker's count of loaded weights


@dataclass
class Turn:
    """One generation by one agent inside an episode (a node of a sequence or a tree)."""

    agent: str
    policy: str
    prompt_ids: list[int]
    completion_ids: list[int]
    text: str
    logprobs: list[float] = field(default_factory=list)
    round: int = 0
    parent: str | None = None
    id: str = field(default_factory=new_id)
    reward: float | None = None
    value: float | None = None
    meta: dict[str, Any] = field(default_factory=dict)
    version: int = 0  # weight version of `policy` that generated it (marl_llm/pipeline.py)

    @classmethod
    def from_completion(cls, c: Completion, agent: str, policy: str, **kw) -> "Turn":
        return cls(agent=agent, policy=policy, prompt_ids=list(c.prompt_ids),
                   completion_ids=list(c.completion_ids), text=c.text,
                   logprobs=list(c.logprobs), version=c.version, **kw)


@dataclass
class Episode:
    """All turns for one task instance, the rewards they earned, and free-form metadata."""

    task: dict[str, Any]
    turns: list[Turn] = field(default_factory=list)
    reward: float | None = None
    components: dict[str, float] = field(default_factory=dict)
    group: str | None = None
    step: int = 0
    id: str = field(default_factory=new_id)
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> "Episode":
        d = dict(d)
        d["turns"] = [Turn(**t) for t in d.get("turns", [])]
        return cls(**d)


@dataclass
class Sample:
    """What a learner consumes for policy-gradient or SFT losses.

    `advantage` drives PG losses; SFT ignores it; `weight` scales the sample's loss. Reference
    log-probs (KL, DPO) are scored by the learner inside the step, never carried here.
    `behavior_logprobs` (one per completion token) are the log-probs of the policy that generated
    the sample (the rollout engine's, `Turn.logprobs`): the PG loss's off-policy correction
    (`LossConfig.off_policy`) weights tokens by exp(logp_proximal - behavior_logprobs).
    """

    prompt_ids: list[int]
    completion_ids: list[int]
    advantage: float = 0.0
    weight: float = 1.0
    behavior_logprobs: list[float] | None = None

    def __post_init__(self):
        if not self.completion_ids:
            raise ValueError("Sample has an empty completion: nothing to train on")


@dataclass
class PairSample:
    """A DPO preference pair under one prompt (the learner scores the reference model itself)."""

    prompt_ids: list[int]
    chosen_ids: list[int]
    rejected_ids: list[int]

    def __post_init__(self):
        if not self.chosen_ids or not self.rejected_ids:
            raise ValueError("PairSample needs non-empty chosen and rejected completions")

    def as_samples(self) -> tuple[Sample, Sample]:
        return Sample(self.prompt_ids, self.chosen_ids), Sample(self.prompt_ids, self.rejected_ids)


def chunks(items: list, size: int):
    it = iter(items)
    while batch := list(itertools.islice(it, size)):
        yield batch
