"""How the command-line entry points (train, evaluate, envcheck) report failures.

A user's mistake (a bad config value, unusable data, a missing model, an unwritable output
folder: `ConfigError` and its subclasses, `DataError`) prints ONE line,
`error: <what is wrong>; <what is allowed>`, and exits with status 2. A run that fails later
(a dead actor, a timeout) or is interrupted prints one `error:` line too and exits 1 (130 after
Ctrl-C, 143 after SIGTERM). `MARL_LLM_DEBUG=1` re-raises instead, so Python prints the
traceback.
"""
from __future__ import annotations

import contextlib
import logging
import os
import signal
import sys
from typing import Iterator

log = logging.getLogger("marl_llm")

USER_ERROR_EXIT = 2


class Interrupted(KeyboardInterrupt):
    """The driver got SIGTERM or SIGINT. A KeyboardInterrupt: no `except Exception` swallows it,
    and Ray's blocking `ray.get` turns a signal handler's KeyboardInterrupt into its own (a plain
    one, so the signal number is kept in `received`)."""


received: list[int] = []  # signals the driver got, in order


def debug() -> bool:
    return os.environ.get("MARL_LLM_DEBUG", "").lower() in ("1", "true", "yes")


def one_line(e: BaseException) -> str:
    """The exception's message on one line (OmegaConf, Hydra and Ray add context lines; Hydra's
    config search path is left out)."""
    text = str(e).split("\nConfig search path:")[0]
    return " ".join(part.strip() for part in text.splitlines() if part.strip()) or type(e).__name__


def user_error_types() -> tuple[type[BaseException], ...]:
    from marl_llm.config import ConfigError
    from marl_llm.data import DataError
    return ConfigError, DataError


def fail(message: str, code: int, log_it: bool = False) -> None:
    if log_it:
        log.error("%s", message)
    print(f"error: {message}", file=sys.stderr, flush=True)
    sys.exit(code)


@contextlib.contextmanager
def reported(run_errors: bool = False, log_it: bool = False) -> Iterator[None]:
    """Turn a user error (and, with `run_errors`, any failure or interrupt) into one `error:` line
    on stderr (`log_it`: and into the log, when the log does not go to stderr)."""
    if debug():
        yield
        return
    try:
        yield
    except user_error_types() as e:
        fail(one_line(e), USER_ERROR_EXIT, log_it)
    except KeyboardInterrupt:
        if not run_errors:
            raise
        signum = received[0] if received else signal.SIGINT
        fail(f"interrupted by {signal.Signals(signum).name}; the run stopped cleanly (no partial checkpoint); "
             "continue it with trainer.resume=true", 128 + signum, log_it)
    except Exception as e:  # noqa: BLE001 — reported on one line; MARL_LLM_DEBUG=1 shows the trace
        if not run_errors:
            raise
        fail(f"{type(e).__name__}: {one_line(e)} (set MARL_LLM_DEBUG=1 for the traceback)", 1, log_it)


_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_active: list = []  # the handler while `stop_on_signals` is in force


def _handler(signum, _frame):
    name = signal.Signals(signum).name
    if received:  # a second signal must not break the clean-up the first one started
        log.warning("%s: already stopping", name)
        return
    received.append(signum)
    log.warning("%s: stopping the run (actors and Ray are shut down; no checkpoint is written half-way)", name)
    raise Interrupted(name)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGTERM and SIGINT raise `Interrupted` in the main thread, so the run unwinds through its
    `finally` blocks (actors killed, Ray stopped, no checkpoint committed half-way)."""
    old = {s: signal.signal(s, _handler) for s in _SIGNALS}
    _active.append(_handler)
    try:
        yield
    finally:
        _active.pop()
        for s, h in old.items():
            signal.signal(s, h)


def reclaim_signals() -> None:
    """Put our handlers back after `ray.init`, which installs its own SIGTERM handler (an exit
    that skips the clean-up and, inside `ray.get`, aborts the driver)."""
    if _active:
        for s in _SIGNALS:
            signal.signal(s, _active[-1])


# ---- arguments: Hydra's flags, our flags, and overrides ------------------------------------------
# Hydra's own flags (hydra/_internal/utils.py get_args_parser); those in _VALUED take a value.
_HYDRA_FLAGS = {"-h", "--help", "--hydra-help", "--version", "--resolve", "-r", "--run", "-m", "--multirun",
                "-c", "--cfg", "-p", "--package", "-i", "--info", "-sc", "--shell-completion", "-cp", "--config-path",
                "-cn", "--config-name", "-cd", "--config-dir", "--experimental-rerun"}
_VALUED = {"-c", "--cfg", "-p", "--package", "-cp", "--config-path", "-cn", "--config-name", "-cd", "--config-dir",
           "--experimental-rerun", "-sc", "--shell-completion"}
VERBOSE_FLAGS = ("-v", "--verbose")
# presets under conf/experiment are not in the defaults list, so Hydra wants `+experiment=`
_APPENDED_GROUPS = ("experiment",)


def split_args(args: list[str]) -> tuple[list[str], list[str], bool]:
    """(Hydra flags with their values, overrides, verbose). `experiment=X` is taken as
    `+experiment=X`. An unknown `-flag` is a user error naming the flags there are."""
    flags, overrides, verbose = [], [], False
    it = iter(args)
    for a in it:
        name = a.split("=", 1)[0]
        if a in VERBOSE_FLAGS:
            verbose = True
        elif name in _HYDRA_FLAGS:
            flags.append(a)
            if name in _VALUED and "=" not in a:
                flags.append(next(it, ""))
        elif a.startswith("-"):
            from marl_llm.config import ConfigError
            raise ConfigError(f"unknown option {a!r}; the options are --help, --verbose, --cfg job|hydra|all, "
                              "--resolve, --multirun, --info (and key=value overrides)")
        elif name in _APPENDED_GROUPS:
            overrides.append("+" + a)
        else:
            overrides.append(a)
    return flags, overrides, verbose


def wants_help(flags: list[str]) -> bool:
    return "-h" in flags or "--help" in flags


def hydra_only(flags: list[str]) -> bool:
    """Flags whose path is Hydra's alone (sweeps, Hydra's own help, shell completion)."""
    return bool({"-m", "--multirun", "--hydra-help", "--version", "-sc", "--shell-completion"} & set(flags))


def prints_only(flags: list[str]) -> bool:
    """`--cfg`/`--info` print the config and run nothing: no output folder is written."""
    return bool({"-c", "--cfg", "-i", "--info"} & {f.split("=", 1)[0] for f in flags})


def override_error(e: BaseException, overrides: list[str], compose) -> str:
    """A Hydra composition failure as one line; an unknown key names the nearest valid keys (the
    config composed without the bad override lists them)."""
    import re

    from marl_llm.confdoc import did_you_mean, flat_keys

    text = one_line(e)
    m = re.search(r"Could not (?:override|append to config)\W+'([\w.]+)'|Key '([\w.]+)' is not in struct", text)
    key = m and (m.group(1) or m.group(2))
    if not key:
        return f"bad override: {text}"
    hint = ""
    inner = re.search(r"Key '\w+' is not in struct\s+full_key: ([\w.]+)", str(e.__cause__ or ""))
    if inner and inner.group(1).startswith(key + "."):  # a mapping set whole, with a key it does not have
        key, parent = inner.group(1), inner.group(1).rsplit(".", 1)[0]
        hint = f" (a new key of a free-form mapping: +{key}=VALUE, or ++{parent}={{...}}, merged into its keys)"
    # the composition's groups only: another bad override must not hide the keys
    rest = [o for o in overrides if "." not in (k := o.lstrip("+~").split("=", 1)[0]) and k != key]
    try:
        valid = flat_keys(compose(rest))
    except Exception:  # noqa: BLE001 — the suggestion is a help; the error is reported either way
        valid = []
    if key in valid:
        return f"bad override: {text}"
    return f"unknown key {key}; {did_you_mean(key, valid)}{hint}"


def set_verbose(verbose: bool) -> None:
    """Whether the engines' own output (Ray actors, vLLM, DeepSpeed) reaches this terminal;
    otherwise it goes to the run's engines.log (marl_llm.cluster). Read by the actors' launcher."""
    os.environ["MARL_LLM_VERBOSE"] = "1" if verbose else "0"


def verbose() -> bool:
    return os.environ.get("MARL_LLM_VERBOSE", "0") == "1"
