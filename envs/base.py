"""The environment interface every task family implements.

An Env owns a task dataset (train and eval splits, never overlapping), per-role prompt builders,
answer extraction, and a joint reward over all agents' outputs with named components. Tasks are
plain dicts (JSON-serialisable) with at least `id`; algorithms never look inside them except
through the Env's methods.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional


@dataclass
class DataConfig:
    """Where an env's tasks come from: a local file/folder (`path`) wins over `hub_id`."""

    path: Optional[str] = None
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None
    # when there is no separate eval split, this many tasks are held out of the train split
    eval_size: int = 200
    # task field -> dataset column (e.g. {question: problem, answer: solution}); merged over the
    # env's defaults. Loading rules: marl_llm/data.py
    fields: dict[str, str] = field(default_factory=dict)
    limit: Optional[int] = None


@dataclass
class EnvConfig:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    system_prompt: Optional[str] = None


@dataclass
class Reward:
    """A joint reward: one scalar for all agents' outputs, plus named components for logging."""

    total: float
    components: dict[str, float] = field(default_factory=dict)
    #: free-form diagnostics (e.g. per-test results) an env's `transition` may reuse; not logged
    info: dict[str, Any] = field(default_factory=dict)


class Env:
    """Base class; subclasses set `Config` and implement the abstract methods."""

    Config = EnvConfig
    #: roles this env can build prompts for (e.g. "single", "leader", "team", "generator")
    roles: tuple[str, ...] = ("single",)
    #: the highest reward `reward()` can give (used for early stopping and reporting)
    max_reward: float = 1.0
    #: the roles whose outputs together form one joint action (MAGRPO's agents, in order)
    joint_roles: tuple[str, ...] = ("single",)

    def __init__(self, cfg: EnvConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self._splits: Optional[tuple[list, list]] = None

    # ---- data -----------------------------------------------------------------------------
    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train tasks, eval tasks), loaded once on first use; subclasses implement this or
        override train_tasks/eval_tasks."""
        raise NotImplementedError

    def _ensure(self) -> tuple[list, list]:
        if self._splits is None:
            self._splits = self._load()
        return self._splits

    def train_tasks(self) -> list[dict[str, Any]]:
        return self._ensure()[0]

    def eval_tasks(self) -> list[dict[str, Any]]:
        return self._ensure()[1]

    def uses_dataset(self) -> bool:
        """`source: auto` reads a dataset iff data.path or data.hub_id is set (else the built-in
        default); `dataset` / `generator` force one side."""
        c = self.cfg
        source = getattr(c, "source", "dataset")
        if source == "auto":
            return bool(c.data.path or c.data.hub_id)
        return source == "dataset"

    # ---- prompts --------------------------------------------------------------------------
    def prompt(self, task: dict[str, Any], role: str = "single", **context: Any) -> list[dict[str, str]]:
        """Chat messages for `role` on `task`; `context` carries other agents' outputs, feedback."""
        raise NotImplementedError

    # ---- scoring --------------------------------------------------------------------------
    def extract_answer(self, text: str) -> Optional[str]:
        return text

    def answers_equal(self, a: Optional[str], b: Optional[str]) -> bool:
        """Whether two extracted answers are the same answer (majority votes group by this);
        envs with equivalent spellings (e.g. math: "3.0" and "3") override it."""
        return a is not None and a == b

    def reward(self, task: dict[str, Any], outputs: dict[str, str]) -> Reward:
        """Joint reward of all agents' outputs (agent name -> text) on `task`."""
        raise NotImplementedError

    def reference_outputs(self, task: dict[str, Any]) -> dict[str, str]:
        """The dataset's own reference answer as agent outputs (for `envcheck --reference`)."""
        raise NotImplementedError

    def transition(self, task: dict[str, Any], outputs: dict[str, str], reward: Reward) -> Optional[dict[str, str]]:
        """Feedback per agent for the next turn (multi-turn algorithms), or None if none."""
        return None

    # ---- extensions (defaults keep older envs working) -----------------------------------------
    def reward_batch(self, items: list[tuple[dict[str, Any], dict[str, str]]]) -> list[Reward]:
        """`reward` over many (task, outputs) pairs; envs that execute code run them in parallel."""
        return [self.reward(task, outputs) for task, outputs in items]

    def max_reward_for(self, roles) -> float:
        """The highest reward for outputs from these roles (e.g. coding: 1.0 single, 4.0 joint)."""
        return self.max_reward


def make_env(cfg: Any, seed: int = 0) -> Env:
    """Build the registered env from a validated Config, a dict or DictConfig with `name`."""
    from marl_llm.config import plugin_config
    from marl_llm.registry import ENVS

    if not isinstance(cfg, EnvConfig):
        cfg = plugin_config(ENVS, "env", cfg)
    return ENVS.get(cfg.name)(cfg, seed=seed)
