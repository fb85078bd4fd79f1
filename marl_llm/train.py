"""`python -m marl_llm.train [group=option ...] [key=value ...]` — compose, validate, check, train.

Examples:
  python -m marl_llm.train                                   # the embedded default (see README)
  python -m marl_llm.train algo=grpo env=math model=tiny trainer.steps=2 learner.num_ranks=2
  python -m marl_llm.train --cfg job algo=grpo env=math      # print the composed config

Bad input (a config value, the data, the model, the output folder) stops before any engine
starts with one line, `error: <what is wrong>; <what is allowed>`, and exit status 2; a run that
fails later (a dead actor, a timeout) or gets SIGTERM/Ctrl-C stops cleanly with one `error:` line
and a non-zero status. `MARL_LLM_DEBUG=1` shows the Python traceback instead (marl_llm/cli.py).
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
    log.info("done: %s", json.dumps(summary))
    print(json.dumps(summary, indent=2))


def precheck(overrides: list[str]) -> None:
    """What Hydra itself would trip on before `_main` runs, as a one-line error: the composition
    (unknown group option or key), the values, and the output folder Hydra logs into."""
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    from marl_llm.preflight import check_output

    try:
        with initialize_config_dir(config_dir=str(conf_dir()), version_base="1.3", job_name="train"):
            cfg = compose(config_name="config", overrides=overrides)
    except (HydraException, OmegaConfBaseException) as e:
        raise ConfigError(f"bad override: {cli.one_line(e)}") from None
    run = validate(cfg)
    check_output(run.trainer.output_dir, run.trainer.resume)


def main() -> None:
    args = sys.argv[1:]
    if not any(a.startswith("-") for a in args):  # --cfg, --help, --multirun: Hydra's own paths
        with cli.reported():
            precheck(args)
    _main()


if __name__ == "__main__":
    main()
