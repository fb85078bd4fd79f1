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
