"""`python -m marl_llm.evaluate` — score policies on an env's test (or dev) split with the algorithm's protocol.

  python -m marl_llm.evaluate run_dir=outputs/grpo-math            # newest checkpoint of a run
  python -m marl_llm.evaluate run_dir=DIR split=dev                # on the dev split: compare settings here
  python -m marl_llm.evaluate run_dir=DIR checkpoint=step_10 trainer.eval_size=200
  python -m marl_llm.evaluate run_dir=DIR baseline=init             # checkpoint vs the initial model
  python -m marl_llm.evaluate run_dir=DIR baseline=init env=reasoning_gym  # ... on a family it never saw
  python -m marl_llm.evaluate run_dir=DIR baseline=init env.task=products '~env.task_config.operators'
                                      # the run's env settings, another family (~key drops a setting it lacks)
  python -m marl_llm.evaluate algo=grpo env=math model=smollm2-135m # a model, no training run

`split=test` (default) scores the first `trainer.eval_size` tasks of the env's test split, the
number to report; `split=dev` those of its dev split, where settings are compared and chosen
(docs/DATA.md: Splits). Policies get rollout workers only (no learners). Prints a table (each score
with its 95% interval and n, e.g. `acc/final  0.3100 [0.25, 0.38], n=200`), the algorithm's paired
comparisons (`acc/final - acc/untrained_final = +0.09 [+0.04, +0.14], n=200`), and writes the
metrics and the split as JSON (`out=FILE`, default `<run_dir>/eval_<checkpoint>.json`, with
split=dev `<run_dir>/eval_<checkpoint>_dev.json`, or `./eval.json`; the per-task outcomes go to the
folder of that name without `.json`). Bad input (config, data, model, run folder, checkpoint, split,
an unwritable `out`) stops before any engine starts with one `error:` line and exit status 2, as in
`marl_llm.train` (`MARL_LLM_DEBUG=1` shows the traceback).

`baseline=init` scores the run's checkpoint, then the initial model (the policies that loaded the
checkpoint are rebuilt from their initial weights; frozen ones are kept) on the same held-out
tasks with the same decoding settings, and prints, for each of the algorithm's headline metrics
(`Algorithm.headline`), `<metric>: after - before = +0.09 [+0.04, +0.14], n=400`: the paired
difference over the tasks. The initial model's metrics are stored as `init/<metric>`, the
differences as `diff/<metric>-init/<metric>` with their intervals.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

from omegaconf import OmegaConf

from marl_llm import cli, runtime
from marl_llm.config import ConfigError, conf_dir, validate
from marl_llm.eval_store import save_evaluation
from marl_llm.preflight import check_run, writable_dir
from marl_llm.stats import (CI_HIGH, CI_LOW, CI_N, DIFF, diff_key, differences, interval_metrics, paired_difference,
                            read_intervals)

log = logging.getLogger("marl_llm.evaluate")
SPECIAL = ("run_dir", "checkpoint", "out", "baseline", "split")
BASELINES = ("init",)
EVAL_SPLITS = ("dev", "test")


def _parse(argv: list[str]):
    special, overrides = {}, []
    for a in argv:
        key = a.split("=", 1)[0]
        if key in SPECIAL and "=" in a:
            special[key] = a.split("=", 1)[1]
        else:
            overrides.append(a)
    return special, overrides


def _compose(special: dict, overrides: list[str]):
    run_dir = special.get("run_dir")
    if run_dir:
        cfg_path = Path(run_dir) / "config.yaml"
        if not cfg_path.is_file():
            raise ConfigError(f"run_dir={run_dir!r} has no config.yaml (not a marl_llm run folder); "
                              "give the trainer.output_dir of a training run")
        cfg = OmegaConf.load(cfg_path)
        from hydra.core.override_parser.overrides_parser import OverridesParser
        from hydra.errors import OverrideParseException
        try:  # Hydra's grammar, as on a training command line (quoting, escapes, lists, mappings)
            parsed = OverridesParser.create().parse_overrides(overrides)
        except OverrideParseException as e:
            raise ConfigError(f"with run_dir=: {e}") from None
        for o in parsed:
            if "." not in o.key_or_group and not o.is_delete():  # a config group
                if o.key_or_group != "env":
                    raise ConfigError(f"with run_dir=, only env=<name> and key=value overrides are allowed "
                                      f"(got {o.input_line!r}: the algorithm and models come from the run)")
                cfg.env = _env_group(o.value())
        for o in (o for o in parsed if o.is_delete()):  # ~key: drop a key the run set
            parent, _, leaf = o.key_or_group.rpartition(".")
            node = OmegaConf.select(cfg, parent) if parent else cfg
            if node is None or not OmegaConf.is_dict(node) or leaf not in node:
                raise ConfigError(f"~{o.key_or_group}: the run's config has no key {o.key_or_group!r} to remove")
            node.pop(leaf)
        for o in (o for o in parsed if "." in o.key_or_group and not o.is_delete()):
            OmegaConf.update(cfg, o.key_or_group, o.value(), merge=True, force_add=True)
        return cfg
    from marl_llm.train import compose
    return compose(overrides)


def _env_group(name: str):
    """`conf/env/<name>.yaml`: with run_dir=, `env=<name>` scores the run's checkpoint on another
    env (e.g. a problem family it never trained on) with the run's algorithm, models and decoding."""
    path = conf_dir() / "env" / f"{name}.yaml"
    if not path.is_file():
        allowed = sorted(p.stem for p in (conf_dir() / "env").glob("*.yaml"))
        raise ConfigError(f"env={name!r} does not exist; choose one of {allowed}")
    return OmegaConf.load(path)


def _split(special: dict) -> str:
    """The split to score (`split=`, default test)."""
    split = special.get("split", "test")
    if split not in EVAL_SPLITS:
        raise ConfigError(f"split={split!r} is not allowed; choose one of {list(EVAL_SPLITS)} (dev: where settings "
                          "are chosen; test: the number to report)")
    return split


def _checkpoint(special: dict) -> Path | None:
    baseline = special.get("baseline")
    if baseline is not None and baseline not in BASELINES:
        raise ConfigError(f"baseline={baseline!r} is not allowed; choose one of {list(BASELINES)} "
                          "(init: the initial model on the same tasks)")
    if "run_dir" not in special:
        if baseline is not None:
            raise ConfigError(f"baseline={baseline} needs run_dir=<a training run folder>: it compares that "
                              "run's checkpoint with the initial model")
        return None
    from marl_llm.checkpoint import CheckpointManager
    ckpts = CheckpointManager(special["run_dir"])
    if "checkpoint" in special:
        path = ckpts.root / special["checkpoint"]
        if not path.is_dir():
            have = [p.name for _, p in ckpts.step_dirs()]
            raise ConfigError(f"checkpoint={special['checkpoint']!r} not found; available: {have}")
        return path
    latest = ckpts.latest()
    if latest is None:
        if baseline is not None:
            raise ConfigError(f"run_dir={special['run_dir']!r} has no checkpoint; baseline={baseline} compares a "
                              "checkpoint with the initial model")
        log.warning("%s has no checkpoint: evaluating the initial models", special["run_dir"])
    return latest


def _out_path(special: dict, ckpt: Path | None, split: str) -> Path:
    """Where the metrics go, checked writable now rather than after the evaluation."""
    if special.get("out"):
        out = Path(special["out"])
    elif "run_dir" in special:
        suffix = "" if split == "test" else f"_{split}"
        out = Path(special["run_dir"]) / f"eval_{ckpt.name if ckpt else 'init'}{suffix}.json"
    else:
        out = Path("eval.json")
    writable_dir(out.expanduser().resolve().parent, f"the folder of out={str(out)!r}")
    return out


def evaluate(run, ckpt: Path | None, folder: Path, baseline: str | None = None, engine_log: Path | None = None,
             split: str = "test") -> dict:
    """Score the policies (`ckpt`'s weights) on the first `trainer.eval_size` tasks of `split`;
    each evaluation's per-task outcomes go to `folder` (with baseline=init, the initial model's
    to `<folder>_init`)."""
    from marl_llm.buffer import TrajectoryBuffer
    from marl_llm.cluster import Cluster

    env, algo = check_run(run, train=False, evaluated=(split,))
    specs = [dataclasses.replace(s, trainable=False) for s in algo.policy_specs()]
    cluster = Cluster(run.cluster)
    policies = {}
    try:
        inits = {s.name: str(ckpt / s.name) if ckpt is not None and (ckpt / s.name).is_dir() else None for s in specs}
        cluster.start(cluster.cpus_needed(specs, run, inits), engine_log=engine_log)
        cli.reclaim_signals()
        policies.update(cluster.build_policies(specs, run, inits))
        algo.setup(policies, TrajectoryBuffer())
        tasks = env.tasks(split)[: run.trainer.eval_size]
        result = {"algo": run.algo.name, "env": run.env.name, "split": split, "checkpoint": str(ckpt) if ckpt else None,
                  "n": len(tasks), **algo.evaluate(tasks)}
        save_evaluation(folder, tasks, algo)
        if baseline == "init":
            after = algo.eval_outcomes
            trained = [s for s in specs if inits[s.name]]
            for worker in {id(w): w for s in trained for w in policies[s.name].rollout_workers}.values():
                cluster.ray.kill(worker)  # only one copy of the weights on the machine at a time
            policies.update(cluster.build_policies(trained, run, {}))
            algo.setup(policies, TrajectoryBuffer())
            result.update({f"init/{k}": v for k, v in algo.evaluate(tasks).items()})
            before = algo.eval_outcomes
            save_evaluation(folder.parent / f"{folder.name}_init", tasks, algo)
            for m in algo.headline:
                if m in after and m in before:
                    result.update(interval_metrics(diff_key(m, f"init/{m}"), paired_difference(after[m], before[m])))
        return result
    finally:
        cluster.shutdown(policies)


def print_table(result: dict) -> None:
    """Every metric (a score with its interval and n on one line), the paired comparisons, and
    with baseline=init the `after - before` lines."""
    intervals = read_intervals(result)
    subkeys = {f"{name}/{s}" for name in intervals for s in (CI_LOW, CI_HIGH, CI_N)}
    shown = {k: v for k, v in result.items() if k not in subkeys and not k.startswith(f"{DIFF}/")}
    width = max(len(k) for k in shown)
    for k, v in shown.items():
        text = str(intervals[k]) if k in intervals else f"{v:.4f}" if isinstance(v, float) else f"{v}"
        print(f"{k:<{width}}  {text}")
    diffs = differences(result)
    lines = [f"{a} - {b} = {iv}" for a, b, iv in diffs if b != f"init/{a}"]
    if lines:
        print("paired comparisons (95% intervals):\n" + "\n".join(f"  {line}" for line in lines))
    for a, b, iv in diffs:
        if b == f"init/{a}":
            print(f"{a}: after - before = {iv}")


def evaluate_run(special: dict, overrides: list[str]) -> tuple[dict, Path]:
    """Validate, score, write: the metrics and the JSON file they were written to (`main` and
    `marl_llm.evaluate_run` of the Python API share it)."""
    split = _split(special)
    run = validate(_compose(special, overrides))
    ckpt = _checkpoint(special)
    out = _out_path(special, ckpt, split)
    # per-task outcomes (and replies) next to the metrics: `python -m marl_llm compare` pairs them with another run's
    result = evaluate(run, ckpt, out.with_suffix(""), special.get("baseline"), engine_log=out.parent / "engines.log",
                      split=split)
    out.write_text(json.dumps(result, indent=2))
    return result, out


def print_help(overrides: list[str]) -> None:
    from marl_llm.confdoc import key_table

    print(__doc__.strip())
    print(f"\nspecial arguments: {', '.join(f'{k}=' for k in SPECIAL)} (above); every other key as in "
          "python -m marl_llm.train:")
    if not any(o.startswith("run_dir=") for o in overrides):
        print(key_table(validate(_compose({}, [o for o in overrides if o.split("=", 1)[0] not in SPECIAL]))))


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    runtime.apply_defaults()
    with cli.reported():
        flags, args, verbose = cli.split_args(sys.argv[1:] if argv is None else argv)
        if cli.wants_help(flags):
            print_help(args)
            return
        if flags:
            raise ConfigError(f"evaluate takes no {' '.join(flags)}; it takes run_dir=, checkpoint=, baseline=, out=, "
                              "split= and key=value overrides (--help, --verbose)")
    cli.set_verbose(verbose)
    if not verbose:
        runtime.quiet_driver()
    special, overrides = _parse(args)
    with cli.reported(run_errors=True), cli.stop_on_signals():
        result, out = evaluate_run(special, overrides)
    print_table(result)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
else:  # `from marl_llm import evaluate` may yield this module: calling it is marl_llm.api.evaluate
    from marl_llm import api as _api
    _api.callable_module(__name__, "evaluate")
