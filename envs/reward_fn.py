"""Your own reward on any env: `env.reward_fn` and `env.reward_weights` (as TRL's `reward_funcs` /
`reward_weights`, verl's `custom_reward_function.path`).

    env.reward_fn=examples.rewards:brevity                      # one function replaces the env's reward
    'env.reward_fn=[env,examples.rewards:brevity]' 'env.reward_weights=[1.0,0.2]'

Each entry is `module:function` (imported with importlib; the current folder is importable) or
`env`, the env's own reward, which counts only when listed. A function is
`fn(task: dict, outputs: dict[str, str]) -> float | dict[str, float]`: `task` is the env's task
dict, `outputs` maps agent/role name -> reply text; a dict return is named components whose sum
is the function's reward. The run trains and evaluates on total = sum_i w_i * r_i (weights default
to 1.0). The Reward's components: the env's own, unprefixed, when `env` is listed (MLPO reads
`correct`); `<function>` for a float return; `<function>/<key>` for each key of a dict return.
Components are unweighted, as the env's own are.

The maximum (`max_reward`, `max_reward_for`) is sum_i w_i * max_i, where a function declares its
maximum as an attribute (`fn.max_reward = 1.0`); an undeclared one, or a negative weight (that
part's maximum needs its minimum), makes it unknown: float("inf").

Bad entries are a `ConfigError` when the env config is validated (`EnvConfig.__post_init__`) and
again when `envs.base.make_env` attaches them, before any engine starts.
"""
from __future__ import annotations

import importlib
import math
import numbers
import os
import sys
from dataclasses import dataclass
from typing import Any, Callable, Optional

from envs.base import Reward
from marl_llm.config import ConfigError, check

ENV = "env"  # the entry that stands for the env's own reward
SPEC_FORM = "'module:function' or 'env' (the env's own reward)"


@dataclass(frozen=True)
class RewardPart:
    name: str  # "env" or the function's name (its components' prefix)
    weight: float
    fn: Optional[Callable[[dict, dict], Any]] = None  # None: the env's own reward

    def max_reward(self, env_max: float) -> float:
        """This part's contribution to the maximum (inf when unknown)."""
        if self.weight == 0:
            return 0.0
        top = env_max if self.fn is None else getattr(self.fn, "max_reward", math.inf)
        return self.weight * top if self.weight > 0 else math.inf

    def score(self, task: dict, outputs: dict[str, str]) -> tuple[float, dict[str, float]]:
        """(the function's reward, its components) for one (task, outputs)."""
        value = self.fn(task, outputs)
        if isinstance(value, dict):
            comps = {f"{self.name}/{k}": _number(self.name, v, f"component {k!r}") for k, v in value.items()}
            return sum(comps.values()), comps
        value = _number(self.name, value, "reward")
        return value, {self.name: value}


def _number(name: str, value: Any, what: str) -> float:
    if not isinstance(value, numbers.Real) or not math.isfinite(value):
        raise TypeError(f"env.reward_fn {name!r} returned {value!r} as its {what}; a reward function must return "
                        "a finite number or a dict of component name -> finite number")
    return float(value)


def reward_specs(value: Any) -> list[str]:
    """`env.reward_fn` as a list of entries (one string or a list of them; None: none)."""
    if value is None:
        return []
    specs = [value] if isinstance(value, str) else list(value) if isinstance(value, (list, tuple)) else None
    check(specs is not None and all(isinstance(s, str) for s in specs), "env.reward_fn", value,
          f"is not a string or a list of strings; give {SPEC_FORM}, or a list of them")
    return [s.strip() for s in specs]


def load_parts(reward_fn: Any, weights: Optional[list[float]]) -> list[RewardPart]:
    """The validated parts of `env.reward_fn` with their `env.reward_weights` ([] when unset)."""
    specs = reward_specs(reward_fn)
    if not specs:
        check(weights is None, "env.reward_weights", weights, "is set but env.reward_fn is not; set both or neither")
        return []
    weights = [1.0] * len(specs) if weights is None else [float(w) for w in weights]
    check(len(weights) == len(specs), "env.reward_weights", weights,
          f"has {len(weights)} entries but env.reward_fn has {len(specs)} ({specs}); give one weight per entry")
    check(all(math.isfinite(w) for w in weights), "env.reward_weights", weights, "must be finite numbers")
    parts = [RewardPart(s, w) if s == ENV else RewardPart(s.split(":", 1)[-1], w, load_function(s))
             for s, w in zip(specs, weights)]
    names = [p.name for p in parts]
    check(len(set(names)) == len(names), "env.reward_fn", specs,
          f"names a reward twice ({names}); each entry's name labels its components, so list each once")
    return parts


def load_function(spec: str) -> Callable:
    """The function named by `module:function`; a ConfigError names what is wrong."""
    module, sep, attr = spec.partition(":")
    if not (sep and module and attr):
        raise ConfigError(f"env.reward_fn entry {spec!r} is not {SPEC_FORM}; e.g. examples.rewards:brevity")
    _cwd_importable()
    try:
        mod = importlib.import_module(module)
    except Exception as e:  # noqa: BLE001 - anything the user's module raises on import is their error
        raise ConfigError(f"env.reward_fn={spec!r}: cannot import module {module!r} ({type(e).__name__}: {e}); "
                          "give an importable module path (relative to the folder you run from)") from None
    if not hasattr(mod, attr):
        found = sorted(k for k, v in vars(mod).items() if callable(v) and not k.startswith("_"))
        raise ConfigError(f"env.reward_fn={spec!r}: module {module!r} has no attribute {attr!r}; "
                          f"its functions: {found}")
    fn = getattr(mod, attr)
    if not callable(fn):
        raise ConfigError(f"env.reward_fn={spec!r}: {module}.{attr} is a {type(fn).__name__}, not callable; "
                          "name a function fn(task, outputs) -> float | dict[str, float]")
    top = getattr(fn, "max_reward", None)
    if top is not None and not isinstance(top, numbers.Real):
        raise ConfigError(f"env.reward_fn={spec!r}: its max_reward attribute is {top!r}; set a number or leave it out")
    return fn


def _cwd_importable() -> None:
    """The folder the run starts from is importable (as with `python -m`; console scripts and
    other launchers leave it off sys.path)."""
    cwd = os.getcwd()
    if not {"", cwd} & set(sys.path):
        sys.path.append(cwd)


class RewardFnEnv:
    """An env whose reward is the weighted sum of `parts`; everything else is the wrapped env's
    (attribute access is forwarded). A wrapper, not a patch: the env's own methods keep calling
    its own `reward`, so the env part is never combined twice."""

    def __init__(self, env, parts: list[RewardPart]):
        self.env = env
        self.parts = parts
        self._uses_env = any(p.fn is None for p in parts)

    def __getattr__(self, name: str):
        if name == "env":  # not set yet (e.g. while unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.env, name)

    def __repr__(self) -> str:
        return f"RewardFnEnv({self.env!r}, {[p.name for p in self.parts]})"

    def reward(self, task: dict[str, Any], outputs: dict[str, str]) -> Reward:
        own = self.env.reward(task, outputs) if self._uses_env else None
        return self._combine(task, outputs, own)

    def reward_batch(self, items: list[tuple[dict[str, Any], dict[str, str]]]) -> list[Reward]:
        # the env's own batch call: coding envs run the sandbox in parallel there
        own = self.env.reward_batch(items) if self._uses_env else [None] * len(items)
        return [self._combine(task, outputs, r) for (task, outputs), r in zip(items, own)]

    def _combine(self, task, outputs, own: Optional[Reward]) -> Reward:
        total, components, info = 0.0, {}, {}
        for part in self.parts:
            if part.fn is None:
                value, comps, info = float(own.total), dict(own.components), own.info
            else:
                value, comps = part.score(task, outputs)
            clash = set(comps) & set(components)
            if clash:
                raise ValueError(f"env.reward_fn: {part.name!r} and an earlier entry both give the component(s) "
                                 f"{sorted(clash)}; rename the function")
            total += part.weight * value
            components.update(comps)
        return Reward(total, components, info)  # info: the env's, which its `transition` may reuse

    @property
    def max_reward(self) -> float:
        return sum(p.max_reward(self.env.max_reward) for p in self.parts)

    def max_reward_for(self, roles) -> float:
        return sum(p.max_reward(self.env.max_reward_for(roles)) for p in self.parts)


def with_reward_fns(env):
    """`env` with its config's `reward_fn` applied (the env itself when none is set)."""
    parts = load_parts(getattr(env.cfg, "reward_fn", None), getattr(env.cfg, "reward_weights", None))
    return RewardFnEnv(env, parts) if parts else env
