"""The Python API: the same validation, outputs and summary as the command line, from a script or
a notebook.

    from marl_llm import RunConfig, compose, evaluate, train

    run = compose("experiment=smoke", "trainer.output_dir=/tmp/smoke")   # CLI overrides -> RunConfig
    run.trainer.steps = 10                                               # edit it as a dataclass
    summary = train(run)                     # the dict the CLI prints; also <output_dir>/summary.json
    result = evaluate(run_dir=run.trainer.output_dir, baseline="init")   # checkpoint vs initial model

`train` also takes the overrides directly (`train(["algo=grpo", "env=toy", "model=tiny"])`).
A RunConfig edited or built by hand (`RunConfig(algo=GRPOConfig(), env=ToyConfig(), ...)`) is
validated again before anything starts. Bad input raises `ConfigError` (or `DataError`) with the
message the CLI prints; nothing exits the interpreter. Logs go to the `marl_llm` loggers (a console
handler is added if the program has none) and to `<output_dir>/train.log`; the engines' own output
to `<output_dir>/engines.log` (`verbose=True`: to the terminal).
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import threading
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence, Union

from marl_llm import cli, runtime
from marl_llm.config import RunConfig, validate

LOG_FORMAT = "[%(asctime)s][%(name)s][%(levelname)s] %(message)s"


def compose(*overrides: str) -> RunConfig:
    """A validated RunConfig from command-line overrides (`algo=grpo`, `trainer.steps=2`,
    `experiment=smoke`), exactly as `python -m marl_llm.train` composes them."""
    from marl_llm.train import compose as hydra_compose

    flags, args, _ = cli.split_args(list(overrides))
    if flags:
        raise ValueError(f"compose takes overrides (key=value), not {flags}")
    return validate(hydra_compose(args))


def as_dict(run: RunConfig) -> dict[str, Any]:
    """A RunConfig as plain data (what the run folder's config.yaml holds)."""
    return {f.name: (dataclasses.asdict(v) if dataclasses.is_dataclass(v) else v)
            for f in dataclasses.fields(run) for v in [getattr(run, f.name)]}


def _run_config(config: Union[RunConfig, Sequence[str], None]) -> RunConfig:
    if config is None:
        return compose()
    if isinstance(config, RunConfig):
        return validate(as_dict(config))  # fields edited after validation are checked again
    if isinstance(config, str):
        raise TypeError("train() takes a RunConfig or a list of overrides, e.g. ['algo=grpo', 'env=toy']")
    return compose(*config)


@contextlib.contextmanager
def _run_logging(log_file: Path, verbose: bool) -> Iterator[None]:
    """What Hydra gives the CLI: INFO logs on the console (if nothing handles them yet) and in
    `log_file`."""
    root = logging.getLogger()
    added = []
    if not root.handlers:
        added.append(logging.StreamHandler())
    log_file.parent.mkdir(parents=True, exist_ok=True)
    added.append(logging.FileHandler(log_file))
    for h in added:
        h.setFormatter(logging.Formatter(LOG_FORMAT))
        root.addHandler(h)
    level = root.level
    root.setLevel(min(level, logging.INFO) if level else logging.INFO)
    cli.set_verbose(verbose)
    if not verbose:
        runtime.quiet_driver()
    try:
        yield
    finally:
        root.setLevel(level)
        for h in added:
            root.removeHandler(h)
            h.close()


def _signals():
    """SIGTERM/Ctrl-C stop the run cleanly; signal handlers can only be set in the main thread."""
    if threading.current_thread() is threading.main_thread():
        return cli.stop_on_signals()
    return contextlib.nullcontext()


def train(config: Union[RunConfig, Sequence[str], None] = None, *, verbose: bool = False) -> dict[str, Any]:
    """Train as `python -m marl_llm.train` does and return its summary (also written to
    `<trainer.output_dir>/summary.json`). `config`: a RunConfig (e.g. from `compose`), a list of
    overrides, or None for the main job."""
    from marl_llm.preflight import check_output
    from marl_llm.trainer import Trainer

    run = _run_config(config)
    check_output(run.trainer.output_dir, run.trainer.resume)
    runtime.apply_defaults()
    with _run_logging(Path(run.trainer.output_dir).resolve() / "train.log", verbose), _signals():
        return Trainer(run).fit()


def evaluate(run_dir: Optional[str] = None, *, overrides: Sequence[str] = (), checkpoint: Optional[str] = None,
             baseline: Optional[str] = None, out: Optional[str] = None, split: Optional[str] = None,
             verbose: bool = False) -> dict[str, Any]:
    """Score a run's checkpoint (or, without `run_dir`, the models the overrides name) as
    `python -m marl_llm.evaluate` does; returns the metrics (also written as JSON to `out`,
    default `<run_dir>/eval_<checkpoint>.json`). `baseline="init"`: also the initial model, paired.
    `split`: "test" (default) or "dev" (where settings are compared)."""
    from marl_llm.evaluate import evaluate_run

    special = {k: v for k, v in (("run_dir", run_dir), ("checkpoint", checkpoint), ("baseline", baseline),
                                 ("out", out), ("split", split)) if v is not None}
    flags, args, _ = cli.split_args(list(overrides))
    if flags:
        raise ValueError(f"evaluate takes overrides (key=value), not {flags}")
    runtime.apply_defaults()
    with _run_logging(Path(run_dir or ".").resolve() / "evaluate.log", verbose), _signals():
        result, _ = evaluate_run(special, args)
    return result


def callable_module(module_name: str, function: str) -> None:
    """Make the module `marl_llm.<function>` callable as the API function of that name.

    `python -m marl_llm.train` and `.evaluate` are modules, and importing a submodule sets the
    package attribute of the same name to it: after that, `from marl_llm import train` yields the
    module, not the function. Calling the module calls the function, so both spellings work."""
    import sys
    import types

    class CallableModule(types.ModuleType):
        def __call__(self, *args, **kwargs):
            return globals()[function](*args, **kwargs)

    sys.modules[module_name].__class__ = CallableModule
