"""The environment interface every task family implements.

An Env owns a task dataset (train, dev and test splits, never overlapping), per-role prompt
builders, answer extraction, and a joint reward over all agents' outputs with named components.
Tasks are plain dicts (JSON-serialisable) with at least `id`; algorithms never look inside them
except through the Env's methods.

Splits (`Env.tasks(split)`, docs/DATA.md): an env's `_load` gives its train tasks and its held-out
tasks, the **test** split. The base class carves the **dev** split out of the train tasks
(`env.dev_size`, a seeded shuffle of the env seed, at most a fifth of them) and drops every train
task that is the same task (`Env.task_key`) as a dev or test task, so no evaluation task is ever
trained on. Dev is what settings are chosen on (the trainer's periodic evaluation); test is
evaluated once, after the last step, and is the number to report.
"""
from __future__ import annotations

import logging
import random
from dataclasses import dataclass, field
from typing import Any, Callable, Optional, Sequence

log = logging.getLogger(__name__)


LONG_PROMPTS = ("drop", "truncate")
SPLITS = ("train", "dev", "test")


@dataclass
class DataConfig:
    """Where an env's tasks come from: a local file/folder (`path`) wins over `hub_id`."""

    path: Optional[str] = None
    hub_id: Optional[str] = None
    hub_config: Optional[str] = None
    split: str = "train"
    eval_split: Optional[str] = None
    # when there is no separate eval split, this many tasks are held out of the train split (the
    # env's test split; its dev split comes out of the train split too: env.dev_size)
    eval_size: int = 200
    # task field -> dataset column (e.g. {question: problem, answer: solution}); merged over the
    # env's defaults. Loading rules: marl_llm/data.py
    fields: dict[str, str] = field(default_factory=dict)
    limit: Optional[int] = None
    # tasks whose prompt does not fit model.max_model_len - rollout.max_new_tokens: "drop" them
    # (the count is logged) or "truncate" their longest text field to fit (marl_llm/data.py)
    long_prompts: str = "drop"

    def __post_init__(self):
        from marl_llm.config import check_choice  # marl_llm.config imports the env registry
        check_choice("env.data.long_prompts", self.long_prompts, LONG_PROMPTS)


@dataclass
class EnvConfig:
    name: str = ""
    data: DataConfig = field(default_factory=DataConfig)
    system_prompt: Optional[str] = None
    #: your own reward (envs/reward_fn.py): 'module:function' or a list of them; the entry `env` is
    #: the env's own reward, which counts only when listed, e.g. [env,examples.rewards:brevity]
    reward_fn: Any = None
    #: one weight per env.reward_fn entry (default all 1.0): the reward is sum_i w_i * r_i
    reward_weights: Optional[list[float]] = None
    #: tasks held out of the train split as the dev split, chosen by a seeded shuffle of the env
    #: seed, never trained on (at most a fifth of the train split); 0: none
    dev_size: int = 100

    def __post_init__(self):
        from envs.reward_fn import load_parts, reward_specs
        from marl_llm.config import check_positive  # marl_llm.config imports the env registry

        check_positive("env.dev_size", self.dev_size, allow_zero=True)

        self.reward_fn = reward_specs(self.reward_fn) or None
        load_parts(self.reward_fn, self.reward_weights)  # imports the functions: a bad entry stops the run here


class _SafeDict(dict):
    def __missing__(self, key):
        return "{" + key + "}"


def fill(template: str, **values: Any) -> str:
    """`template` with `{key}` placeholders filled from `values` (None -> ""); placeholders
    without a value stay as they are."""
    return template.format_map(_SafeDict({k: ("" if v is None else v) for k, v in values.items()}))


def majority_index(answers: Sequence[Optional[str]],
                   equal: Optional[Callable[[str, str], bool]] = None) -> Optional[int]:
    """Index of a representative of the most common answer (the first position that gave it).

    None answers (nothing extractable) do not vote; ties go to the answer that appeared first;
    None if no position has an answer. `equal` groups equivalent answers (default ==; pass the
    env's `answers_equal`)."""
    equal = equal or (lambda a, b: a == b)
    reps: list[int] = []
    counts: list[int] = []
    for i, a in enumerate(answers):
        if a is None:
            continue
        for k, r in enumerate(reps):
            if equal(a, answers[r]):
                counts[k] += 1
                break
        else:
            reps.append(i)
            counts.append(1)
    if not reps:
        return None
    return reps[counts.index(max(counts))]


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
    #: roles this env can build prompts for: the task's own roles (e.g. "single"; writing's
    #: "agent1"/"agent2"), never a protocol's (those prompts belong to the algorithms)
    roles: tuple[str, ...] = ("single",)
    #: the highest reward `reward()` can give (used for early stopping and reporting)
    max_reward: float = 1.0
    #: the roles whose outputs together form one joint action (MAGRPO's agents, in order)
    joint_roles: tuple[str, ...] = ("single",)
    #: the task fields a dataset file must provide (through `env.data.fields` or same-named
    #: columns); empty for generated tasks (docs/DATA.md has each family's schema)
    columns: tuple[str, ...] = ()

    def __init__(self, cfg: EnvConfig, seed: int = 0):
        self.cfg = cfg
        self.seed = seed
        self._splits: Optional[dict[str, list]] = None

    # ---- data -----------------------------------------------------------------------------
    def _load(self) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
        """(train tasks, test tasks), loaded once on first use; the dev split is carved out of the
        train tasks afterwards (`_split`)."""
        raise NotImplementedError

    def task_key(self, task: dict[str, Any]) -> Any:
        """What makes two tasks the same task: a train task with the key of a dev or test task is
        dropped. Default: the id; envs whose data repeat a problem under other ids (math,
        reasoning_gym: the question text) override it."""
        return task["id"]

    def _ensure(self) -> dict[str, list]:
        if self._splits is None:
            self._splits = self._split(*self._load())
        return self._splits

    def _split(self, train: list, test: list) -> dict[str, list]:
        """train/dev/test from `_load`'s (train, test): dev is a seeded pick of the train tasks
        that are not a test task; train is the rest, without the dev tasks' repeats."""
        train = self._unseen(train, test, "test")
        k = min(self.cfg.dev_size, len(train) // 5)
        if k < self.cfg.dev_size:
            log.info("env %r: env.dev_size=%d is more than a fifth of the %d train tasks; holding out %d as the "
                     "dev split", self.cfg.name, self.cfg.dev_size, len(train), k)
        order = list(range(len(train)))
        random.Random(f"marl_llm-dev-{self.seed}").shuffle(order)
        held = set(order[:k])
        dev = [t for i, t in enumerate(train) if i in held]
        rest = [t for i, t in enumerate(train) if i not in held]
        return {"train": self._unseen(rest, dev, "dev"), "dev": dev, "test": list(test)}

    def _unseen(self, train: list, held: list, split: str) -> list:
        """The train tasks that are not the same task (`task_key`) as one of `held` (the `split` split)."""
        keys = {self.task_key(t) for t in held}
        kept = [t for t in train if self.task_key(t) not in keys]
        if len(kept) < len(train):
            log.info("env %r: dropped %d train task(s) that are the same task as a %s task", self.cfg.name,
                     len(train) - len(kept), split)
        return kept

    def tasks(self, split: str) -> list[dict[str, Any]]:
        """The tasks of `split`: "train" (trained on), "dev" (the periodic evaluation; settings
        are chosen on it) or "test" (evaluated once, the number to report)."""
        if split not in SPLITS:
            from marl_llm.config import ConfigError
            raise ConfigError(f"split={split!r} is not a split; choose one of {list(SPLITS)}")
        return self._ensure()[split]

    def train_tasks(self) -> list[dict[str, Any]]:
        return self.tasks("train")

    def stop(self, role: str) -> list[str]:
        """Strings that end a reply in `role` (generation stops there; the text keeps them).
        Default: none, replies run to EOS or `rollout.max_new_tokens`."""
        return []

    def fit_prompts(self, tokenizer, limit: int) -> None:
        """Keep only tasks whose first-turn prompts (every joint role's) fit in `limit` tokens of
        `tokenizer`; `data.long_prompts=truncate` cuts them to fit instead (marl_llm.data.fit_prompts)."""
        from marl_llm.data import fit_prompts

        data = getattr(self.cfg, "data", None)
        mode = getattr(data, "long_prompts", "drop")

        def prompts(task):
            return [self.prompt(task, role) for role in self.joint_roles]

        name = self.cfg.name
        self._splits = {split: fit_prompts(tasks, prompts, tokenizer, limit, mode, f"env {name!r} {split} split")
                        for split, tasks in self._ensure().items()}
        self._limit_context(tokenizer, limit)

    # ---- contexts that outgrow the model (multi-turn feedback, other agents' outputs) ---------------
    def _limit_context(self, tokenizer, limit: int) -> None:
        """From now on `prompt(task, role, **context)` (and every prompt built with `fit_context`,
        e.g. a protocol's own role prompts) cuts the longest context text (an earlier turn's output,
        feedback, team answers) until the templated prompt fits in `limit` tokens, and logs each
        cut, so a growing multi-turn context never reaches the engine too long."""
        limits = self.__dict__.setdefault("_context_limits", [])
        limits.append((tokenizer, limit))
        if "prompt" not in self.__dict__:  # bound once per instance, whatever the subclass's prompt
            unbounded = self.prompt
            self.prompt = lambda task, role="single", **context: self.fit_context(
                lambda **c: unbounded(task, role, **c), task, role, context)

    def _excess(self, messages) -> int:
        """Tokens over the tightest limit (<= 0: fits); counted only when the text could be too long."""
        from marl_llm.rollout.worker import prompt_ids_of
        from marl_llm.types import GenerationRequest

        chars = sum(len(m["content"]) for m in messages) + 16 * len(messages)  # a token spans >= 1 char
        over = -1
        for tokenizer, limit in self.__dict__.get("_context_limits", []):
            if chars > limit:
                over = max(over, len(prompt_ids_of(tokenizer, GenerationRequest(messages=messages))) - limit)
        return over

    def fit_context(self, build: Callable[..., list[dict[str, str]]], task: dict[str, Any], role: str,
                    context: dict[str, Any]) -> list[dict[str, str]]:
        """`build(**context)`; once the models' limits are known (`fit_prompts`), with the longest
        context texts cut until the prompt fits."""
        messages = build(**context)
        over = self._excess(messages) if context else -1
        if over <= 0:
            return messages
        tokenizer = self._context_limits[0][0]
        context, before = dict(context), over
        while over > 0:
            texts = [(len(v), k, None) for k, v in context.items() if isinstance(v, str)]
            texts += [(len(x), k, i) for k, v in context.items() if isinstance(v, (list, tuple))
                      for i, x in enumerate(v) if isinstance(x, str)]
            size, key, i = max(texts, default=(0, None, None))
            if size == 0:
                raise ValueError(f"env {self.cfg.name!r}: the prompt of role {role!r} on task {task.get('id')!r} is "
                                 f"{over} tokens too long even without its context; raise model.max_model_len")
            text = context[key] if i is None else context[key][i]
            ids = tokenizer(text, add_special_tokens=False)["input_ids"]
            cut = tokenizer.decode(ids[: max(0, len(ids) - over - 8)])  # slack: merges at the cut
            cut = cut + " [...]" if cut else ""
            if i is None:
                context[key] = cut
            else:
                context[key] = [cut if j == i else x for j, x in enumerate(context[key])]
            messages = build(**context)
            over = self._excess(messages)
        log.warning("env %r: the context of role %r on task %r was %d tokens too long for the model; its longest "
                    "parts were cut to fit (model.max_model_len - rollout.max_new_tokens)",
                    self.cfg.name, role, task.get("id"), before)
        return messages

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

    def lenient_answer(self, text: str) -> Optional[str]:
        """A forgiving reading of a reply's final answer, for evaluation diagnostics only (never a
        reward): what a lenient grader would take as the answer where `extract_answer` finds none
        (envs/qa.py "Readings of a reply"). Default: `extract_answer`."""
        return self.extract_answer(text)

    def answers_equal(self, a: Optional[str], b: Optional[str]) -> bool:
        """Whether two extracted answers are the same answer (majority votes group by this);
        envs with equivalent spellings (e.g. math: "3.0" and "3") override it."""
        return a is not None and a == b

    def majority_vote(self, texts: Sequence[str]) -> Optional[str]:
        """The most common answer extracted from `texts` (ties: the first to appear); None if none."""
        answers = [self.extract_answer(t or "") for t in texts]
        i = majority_index(answers, self.answers_equal)
        return None if i is None else answers[i]

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
    """Build the registered env from a validated Config, a dict or DictConfig with `name`, with
    its `reward_fn` applied (envs/reward_fn.py). Every place that builds an env calls this."""
    from envs.reward_fn import with_reward_fns
    from marl_llm.config import plugin_config
    from marl_llm.registry import ENVS

    if not isinstance(cfg, EnvConfig):
        cfg = plugin_config(ENVS, "env", cfg)
    return with_reward_fns(ENVS.get(cfg.name)(cfg, seed=seed))
