"""`python -m marl_llm.evaluate` — score policies on an env's eval split with the algorithm's protocol.

  python -m marl_llm.evaluate run_dir=outputs/grpo-math            # newest checkpoint of a run
  python -m marl_llm.evaluate run_dir=DIR checkpoint=step_10 trainer.eval_size=200
  python -m marl_llm.evaluate algo=grpo env=math model=smollm2-135m # a model, no training run

Policies get rollout workers only (no learners). Prints a table and writes the metrics as JSON
(`out=FILE`, default `<run_dir>/eval_<checkpoint>.json` or `./eval.json`). Bad input (config,
data, model, run folder, checkpoint, an unwritable `out`) stops before any engine starts with one
`error:` line and exit status 2, as in `marl_llm.train` (`MARL_LLM_DEBUG=1` shows the traceback).
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
from marl_llm.preflight import check_run, writable_dir

log = logging.getLogger("marl_llm.evaluate")
SPECIAL = ("run_dir", "checkpoint", "out")


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
        bad = [o for o in overrides if "." not in o.split("=", 1)[0]]
        if bad:
            raise ConfigError(f"with run_dir=, only key=value overrides are allowed (got {bad})")
        return OmegaConf.merge(OmegaConf.load(cfg_path), OmegaConf.from_dotlist(overrides))
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException
    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3"):
            return compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {cli.one_line(e)}") from None


def _checkpoint(special: dict) -> Path | None:
    if "run_dir" not in special:
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
        log.warning("%s has no checkpoint: evaluating the initial models", special["run_dir"])
    return latest


def _out_path(special: dict, ckpt: Path | None) -> Path:
    """Where the metrics go, checked writable now rather than after the evaluation."""
    if special.get("out"):
        out = Path(special["out"])
    elif "run_dir" in special:
        out = Path(special["run_dir"]) / f"eval_{ckpt.name if ckpt else 'init'}.json"
    else:
        out = Path("eval.json")
    writable_dir(out.expanduser().resolve().parent, f"the folder of out={str(out)!r}")
    return out


def evaluate(run, ckpt: Path | None) -> dict:
    from marl_llm.buffer import TrajectoryBuffer
    from marl_llm.cluster import Cluster

    env, algo = check_run(run, train=False)
    specs = [dataclasses.replace(s, trainable=False) for s in algo.policy_specs()]
    cluster = Cluster(run.cluster)
    policies = {}
    try:
        cluster.start(cluster.cpus_needed(specs, run))
        cli.reclaim_signals()
        policies.update(cluster.build_policies(specs, run, {
            s.name: str(ckpt / s.name) if ckpt is not None and (ckpt / s.name).is_dir() else None for s in specs}))
        algo.setup(policies, TrajectoryBuffer())
        tasks = env.eval_tasks()[: run.trainer.eval_size]
        metrics = algo.evaluate(tasks)
        return {"algo": run.algo.name, "env": run.env.name, "checkpoint": str(ckpt) if ckpt else None,
                "n": len(tasks), **metrics}
    finally:
        cluster.shutdown(policies)


def print_table(result: dict) -> None:
    width = max(len(k) for k in result)
    for k, v in result.items():
        print(f"{k:<{width}}  {v:.4f}" if isinstance(v, float) else f"{k:<{width}}  {v}")


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="[%(asctime)s][%(name)s][%(levelname)s] %(message)s")
    runtime.apply_defaults()
    special, overrides = _parse(sys.argv[1:] if argv is None else argv)
    with cli.reported(run_errors=True), cli.stop_on_signals():
        run = validate(_compose(special, overrides))
        ckpt = _checkpoint(special)
        out = _out_path(special, ckpt)
        result = evaluate(run, ckpt)
    print_table(result)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
