"""Check an env (and its data) before training: score the dataset's own reference answers.

    python -m marl_llm.envcheck env=math env.data.path=gsm8k.jsonl --reference --limit 200 --json
    python -m marl_llm.envcheck env=coding --reference --shuffle
    python -m marl_llm.envcheck env=reasoning_gym env.task=countdown      # describe only

The env is composed from conf/env/<name>.yaml plus Hydra-style overrides (``env.key=value``,
``+env.new_key=value``; ``seed=N`` sets the env seed), validated against the env's Config, and
built. With ``--reference`` every task's ``env.reference_outputs(task)`` is scored with
``env.reward``; ``--shuffle`` pairs each task with another task's reference (a sanity check: it
should score near zero). A summary table goes to stdout; with ``--json`` the last line is a JSON
object with at least ``n``, ``mean_reward`` and ``max_reward`` (null when unknown: an
``env.reward_fn`` function without a declared ``max_reward``). Bad configs or data exit with
status 2 and one line, ``error: <what is wrong>; <what is allowed>``, as in ``marl_llm.train``
(``MARL_LLM_DEBUG=1`` shows the traceback).
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any, Optional

from envs.base import SPLITS, make_env
from marl_llm import cli
from marl_llm.config import ConfigError, plugin_config
from marl_llm.preflight import load_tasks
from marl_llm.registry import ENVS


def env_conf_dir() -> Path:
    """The config root holding env/<name>.yaml (`marl_llm.config.conf_dir()`, else conf/ beside
    the package when the top-level config.yaml does not exist yet)."""
    from marl_llm import config as _config

    try:
        return _config.conf_dir()
    except FileNotFoundError:
        return Path(_config.__file__).resolve().parent.parent / "conf"


def compose_env(name: str, overrides: Optional[list[str]] = None):
    """The validated Config of env `name`: conf/env/<name>.yaml + Hydra overrides (``env.x=y``)."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException

    root = env_conf_dir()
    available = sorted(p.stem for p in (root / "env").glob("*.yaml"))
    if name not in available:
        raise ConfigError(f"env={name!r} has no config file {root / 'env' / (name + '.yaml')}; "
                          f"choose one of {available}")
    ovs = []
    for o in overrides or []:
        key = o.split("=", 1)[0].lstrip("+~")
        if not (key == "env" or key.startswith("env.")):
            raise ConfigError(f"override {o!r}: envcheck only takes env.* overrides (and seed=N)")
        ovs.append(o)
    try:
        with initialize_config_dir(config_dir=str(root), version_base=None, job_name="envcheck"):
            cfg = compose(config_name=None, overrides=[f"+env={name}", *ovs])
    except HydraException as e:
        msg = " ".join(l.strip() for l in str(e).splitlines() if l.strip())
        raise ConfigError(f"bad override for env {name!r}: {msg}") from None
    return plugin_config(ENVS, "env", cfg.env)


def build_env(name: str, overrides: Optional[list[str]] = None, seed: int = 0):
    return make_env(compose_env(name, overrides), seed=seed)


def _fmt(x: Optional[float], spec: str = ".4f") -> str:
    """A number in words where it has no value: None (not applicable), inf (unknown: an
    env.reward_fn function that declares no max_reward)."""
    if x is None:
        return "n/a"
    return format(x, spec) if math.isfinite(x) else "unknown"


def _json_safe(x: Any) -> Any:
    """`x` with non-finite floats as None (JSON has no Infinity; the line prints null)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _json_safe(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_json_safe(v) for v in x]
    return x


def check(env, *, split: str = "all", limit: Optional[int] = None, shuffle: bool = False,
          batch: int = 64, progress: bool = True) -> dict[str, Any]:
    """Score reference outputs; returns the summary dict."""
    tasks = [t for s in (SPLITS if split == "all" else (split,)) for t in env.tasks(s)]
    if limit is not None:
        tasks = tasks[:limit]
    n = len(tasks)
    refs = [env.reference_outputs(t) for t in tasks]
    if shuffle and n > 1:
        refs = refs[1:] + refs[:1]  # every task gets another task's reference
    t0 = time.time()
    rewards = []
    for i in range(0, n, batch):
        rewards += env.reward_batch(list(zip(tasks[i:i + batch], refs[i:i + batch])))
        if progress and n > batch:
            print(f"  scored {min(i + batch, n)}/{n}", file=sys.stderr, flush=True)
    roles = sorted({k for r in refs for k in r})
    max_r = float(env.max_reward_for(roles)) if roles else float(env.max_reward)
    totals = [float(r.total) for r in rewards]
    comp_keys = sorted({k for r in rewards for k in r.components})
    comps = {k: sum(float(r.components.get(k, 0.0)) for r in rewards) / n for k in comp_keys} if n else {}
    return {
        "env": getattr(env.cfg, "name", type(env).__name__), "split": split, "shuffle": shuffle, "n": n,
        "mean_reward": sum(totals) / n if n else 0.0, "max_reward": max_r,
        "min_reward": min(totals) if totals else 0.0,
        "frac_max": None if math.isinf(max_r) else sum(t >= max_r - 1e-9 for t in totals) / n if n else 0.0,
        "components": comps, "roles": roles, "seconds": round(time.time() - t0, 3),
        "worst": [tasks[i]["id"] for i in sorted(range(n), key=lambda i: totals[i])[:5] if totals[i] < max_r - 1e-9],
    }


def describe(env) -> dict[str, Any]:
    splits = {s: env.tasks(s) for s in SPLITS}
    first = next((t for tasks in splits.values() for t in tasks), None)
    example = env.prompt(first, env.roles[0]) if first is not None else []
    return {"env": env.cfg.name, **{f"n_{s}": len(tasks) for s, tasks in splits.items()}, "roles": list(env.roles),
            "joint_roles": list(getattr(env, "joint_roles", ())), "max_reward": float(env.max_reward),
            "example_prompt": example}


def _table(s: dict[str, Any]) -> str:
    rows = [("env", s["env"]), ("split", s["split"] + (" (shuffled references)" if s["shuffle"] else "")),
            ("tasks", str(s["n"])), ("mean reward", _fmt(s["mean_reward"])), ("max reward", _fmt(s["max_reward"])),
            ("min reward", _fmt(s["min_reward"])), ("share at max", _fmt(s["frac_max"]))]
    rows += [(f"  {k}", _fmt(v)) for k, v in s["components"].items()]
    rows += [("seconds", str(s["seconds"]))]
    if s["worst"]:
        rows.append(("lowest tasks", ", ".join(map(str, s["worst"]))))
    w = max(len(a) for a, _ in rows)
    return "\n".join(f"{a.ljust(w)}  {b}" for a, b in rows)


def main(argv: Optional[list[str]] = None) -> int:
    """The exit status: 0, or 2 for bad input (after one `error:` line on stderr)."""
    try:
        return _run(argv)
    except SystemExit as e:  # argparse and cli.reported exit; a caller of main() gets the status
        return e.code if isinstance(e.code, int) else 1


def _epilog(argv: list[str]) -> str:
    """Overrides, and with --help the keys of `env=<name>` (math if none is given) described."""
    text = "Overrides: env=<name> (required), env.<key>=<value>, seed=<int>."
    if not {"-h", "--help"} & set(argv):
        return text
    from marl_llm.confdoc import key_table

    name = next((a.split("=", 1)[1] for a in argv if a.startswith("env=")), "math")
    try:
        cfg = compose_env(name, [])
    except ConfigError as e:
        return f"{text}\n{e}"
    return f"{text}\n\nkeys of env={name} (key = default):{key_table(cfg, 'env.')}"


def _run(argv: Optional[list[str]]) -> int:
    ap = argparse.ArgumentParser(prog="python -m marl_llm.envcheck", description=__doc__.split("\n\n")[0],
                                 epilog=_epilog(argv or []), formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reference", action="store_true", help="score the dataset's reference outputs")
    ap.add_argument("--shuffle", action="store_true", help="pair references with the wrong tasks")
    ap.add_argument("--limit", type=int, default=None, help="score at most N tasks")
    ap.add_argument("--split", choices=(*SPLITS, "all"), default="all")
    ap.add_argument("--json", action="store_true", help="end with one JSON line")
    ap.error = lambda message: cli.fail(message, cli.USER_ERROR_EXIT)  # one line, like every other error
    args, rest = ap.parse_known_args(argv)
    name, seed, overrides = None, 0, []
    for a in rest:
        if a.startswith("-"):
            ap.error(f"unknown option {a}")
        if "=" not in a:
            ap.error(f"{a!r} is not an override (key=value)")
        key, val = a.split("=", 1)
        if key == "env":
            name = val
        elif key == "seed":
            if not val.lstrip("-").isdigit():
                ap.error(f"seed={val!r} is not an integer")
            seed = int(val)
        else:
            overrides.append(a)
    if not name:
        avail = sorted(p.stem for p in (env_conf_dir() / "env").glob("*.yaml"))
        ap.error(f"env=<name> is required; one of {avail}")
    with cli.reported():
        env = build_env(name, overrides, seed=seed)
        load_tasks(env)
        summary = check(env, split=args.split, limit=args.limit, shuffle=args.shuffle) if args.reference \
            else describe(env)
    if args.reference:
        print(_table(summary))
    else:
        sizes = " / ".join(f"{summary['n_' + s]} {s}" for s in SPLITS)
        print(f"env {summary['env']}: {sizes} tasks; "
              f"roles {summary['roles']}; max reward {_fmt(summary['max_reward'], '')}")
        for m in summary["example_prompt"]:
            print(f"--- {m['role']} ---\n{m['content']}")
    if args.json:
        print(json.dumps(_json_safe(summary), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
