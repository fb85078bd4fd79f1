"""Metrics sinks (metrics.jsonl always; TensorBoard and Weights & Biases on request) and per-phase timers."""
from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from collections import defaultdict
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Optional, Sequence

import yaml

log = logging.getLogger(__name__)


class PhaseTimer:
    """Accumulates wall-clock seconds per named phase (`with timer("generate"): ...`), per thread
    (the trainer's rollout thread times its collect apart from the training thread). `pop` also
    gives each phase's span, `span/<phase>/start|end` in seconds since `origin` (the run's start):
    the timeline of which actor did what when."""

    def __init__(self, origin: Optional[float] = None):
        self.origin = time.perf_counter() if origin is None else origin
        self._local = threading.local()

    @property
    def seconds(self) -> dict[str, float]:
        if not hasattr(self._local, "seconds"):
            self._local.seconds, self._local.spans = defaultdict(float), {}
        return self._local.seconds

    @contextmanager
    def __call__(self, phase: str):
        seconds = self.seconds
        t0 = time.perf_counter()
        try:
            yield
        finally:
            t1 = time.perf_counter()
            seconds[phase] += t1 - t0
            start, _ = self._local.spans.get(phase, (t0, t1))
            self._local.spans[phase] = (start, t1)

    def pop(self) -> dict[str, float]:
        out = {f"time/{k}": round(v, 4) for k, v in self.seconds.items()}
        for k, (a, b) in self._local.spans.items():
            out[f"span/{k}/start"], out[f"span/{k}/end"] = round(a - self.origin, 3), round(b - self.origin, 3)
        self.seconds.clear()
        self._local.spans.clear()
        return out


def mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def _load_config(out_dir: Path) -> dict[str, Any]:
    path = out_dir / "config.yaml"
    if not path.exists():
        return {}
    return yaml.safe_load(path.read_text()) or {}


class _TensorBoard:
    def __init__(self, out_dir: Path):
        from torch.utils.tensorboard import SummaryWriter
        self.writer = SummaryWriter(str(out_dir / "tensorboard"))

    def log(self, scalars: dict[str, float], step: int) -> None:
        for k, v in scalars.items():
            self.writer.add_scalar(k, v, step)
        self.writer.flush()

    def close(self) -> None:
        self.writer.close()


class _Wandb:
    """A Weights & Biases run per trainer process. Mode, project and entity come from wandb's own
    environment variables (WANDB_MODE=offline needs no network or login; WANDB_PROJECT defaults
    to marl_llm); files go to $WANDB_DIR or else the run folder (`<run>/wandb/`). The run's
    config.yaml is the wandb config; system-stats sampling is off (it costs a CPU on small machines)."""

    def __init__(self, out_dir: Path):
        import wandb
        self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "marl_llm"), name=out_dir.name,
                              dir=os.environ.get("WANDB_DIR", str(out_dir)), config=_load_config(out_dir),
                              settings=wandb.Settings(x_disable_stats=True, console="off", silent=True))
        log.info("wandb run %s (%s mode): %s", self.run.id, self.run.settings.mode, self.run.dir)

    def log(self, scalars: dict[str, float], step: int) -> None:
        self.run.log(scalars, step=step)

    def close(self) -> None:
        import wandb
        self.run.finish()
        wandb.teardown()  # finish() can return before wandb's service has written the run file


_SINKS = {"tensorboard": _TensorBoard, "wandb": _Wandb}
LOGGERS = tuple(_SINKS)


class MetricsLogger:
    """Appends one JSON object per step to metrics.jsonl (flushed and fsynced, so a crash loses
    nothing already logged) and sends the same numeric scalars, under the same names, to each of
    `loggers` (any of LOGGERS)."""

    def __init__(self, out_dir: str | os.PathLike, loggers: Sequence[str] = ("tensorboard",)):
        unknown = [n for n in loggers if n not in _SINKS]
        if unknown:
            raise ValueError(f"unknown loggers {unknown}; choose from {list(LOGGERS)}")
        self.path = Path(out_dir) / "metrics.jsonl"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.sinks = [_SINKS[n](self.path.parent) for n in dict.fromkeys(loggers)]

    def log(self, record: dict[str, Any]) -> None:
        clean = {k: (None if isinstance(v, float) and math.isnan(v) else v) for k, v in record.items()}
        with open(self.path, "a") as f:
            f.write(json.dumps(clean) + "\n")
            f.flush()
            os.fsync(f.fileno())
        scalars = {k: v for k, v in clean.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        for sink in self.sinks:
            sink.log(scalars, int(record.get("step", 0)))

    def truncate_after(self, step: int) -> None:
        """Drop records of steps after `step` (a resume replays them)."""
        if not self.path.exists():
            return
        keep = [l for l in self.path.read_text().splitlines() if l.strip() and json.loads(l).get("step", 0) <= step]
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text("".join(l + "\n" for l in keep))
        os.replace(tmp, self.path)

    def close(self) -> None:
        for sink in self.sinks:
            sink.close()
