"""`python -m marl_llm.train [group=option ...] [key=value ...] [--verbose]` — compose, validate, check, train.

Examples:
  python -m marl_llm.train                                   # the main job (MLPO, SmolLM2-135M, env=math)
  python -m marl_llm.train algo=grpo env=math model=tiny trainer.steps=2 learner.num_ranks=2
  python -m marl_llm.train experiment=cpu_grpo_math          # a preset (same as +experiment=...)
  python -m marl_llm.train --cfg job algo=grpo env=math      # print the composed, validated config
  python -m marl_llm.train --help algo=magrpo                # every key of that composition, described

Bad input (a config value, a misspelt key, the data, the model, the output folder) stops before any
engine starts with one line, `error: <what is wrong>; <what is allowed>`, and exit status 2; a run
that fails later (a dead actor, a timeout) or gets SIGTERM/Ctrl-C stops cleanly with one `error:`
line and a non-zero status. `MARL_LLM_DEBUG=1` shows the Python traceback instead. The engines'
own output (vLLM, DeepSpeed, Ray actors) goes to `<trainer.output_dir>/engines.log`; `--verbose`
prints it here too. The summary is printed once, as JSON, and written to `summary.json`.
"""
from __future__ import annotations

import json
import logging
import sys

import hydra
from omegaconf import DictConfig

from marl_llm import cli, runtime
from marl_llm.config import ConfigError, conf_dir, validate

log = logging.getLogger("marl_llm.train")


@hydra.main(config_path=str(conf_dir()), config_name="config", version_base="1.3")
def _main(cfg: DictConfig) -> None:
    runtime.apply_defaults()
    with cli.reported(run_errors=True, log_it=True), cli.stop_on_signals():  # Hydra logs to stdout and train.log
        from marl_llm.trainer import Trainer

        summary = Trainer(validate(cfg)).fit()
    print(json.dumps(summary, indent=2))


def compose(overrides: list[str]) -> DictConfig:
    """The Hydra composition of `overrides`, its failures as one-line errors (a misspelt key gets
    the nearest valid keys)."""
    from hydra import compose as hydra_compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
            return hydra_compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(cli.override_error(e, overrides, compose)) from None


def precheck(overrides: list[str], output: bool = True) -> None:
    """What Hydra itself would trip on before `_main` runs, as a one-line error: the composition
    (unknown group option or key), the values, the plugins' own checks (`Algorithm.validate`), and
    (`output`) the folder Hydra logs into."""
    from marl_llm.preflight import check_output, check_plugins

    run = validate(compose(overrides))
    check_plugins(run)
    if output:
        check_output(run.trainer.output_dir, run.trainer.resume)


def print_help(overrides: list[str]) -> None:
    from marl_llm.confdoc import group_options, key_table

    run = validate(compose(overrides))
    print(__doc__.strip())
    print(f"\nconfig groups (group=option):\n{group_options()}")
    print(f"\nkeys (key = value for this composition{': ' + ' '.join(overrides) if overrides else ''}):"
          f"{key_table(run)}")


def main(argv: list[str] | None = None) -> None:
    with cli.reported():
        flags, overrides, verbose = cli.split_args(sys.argv[1:] if argv is None else argv)
        if cli.wants_help(flags):
            print_help(overrides)
            return
        if not cli.hydra_only(flags):  # a sweep (--multirun) is checked per job by _main
            precheck(overrides, output=not cli.prints_only(flags))
    cli.set_verbose(verbose)
    if not verbose:
        runtime.quiet_driver()
    sys.argv = [sys.argv[0], *flags, *overrides]
    _main()


if __name__ == "__main__":
    main()
else:  # `from marl_llm import train` may yield this module: calling it is marl_llm.api.train
    from marl_llm import api as _api
    _api.callable_module(__name__, "train")
