"""Checkpoints: `checkpoints/step_<N>/` holds one Hugging Face folder per trained policy
(`<policy>/`: config, safetensors, tokenizer — `from_pretrained` and vLLM load it), the learners'
DeepSpeed state for exact resume (`_deepspeed/<policy>/`; a learner of another rank count re-shards
it on load, `LearnerWorker.load_state`) and `trainer_state.json` (step, data position, RNG, buffer
length: the driver's, so they do not depend on the learners' rank count).

A checkpoint is written into `step_<N>.tmp` and renamed when complete, so a crash mid-save never
leaves a half checkpoint that resume would pick up; older complete checkpoints are kept until the
new one exists.
"""
from __future__ import annotations

import json
import logging
import os
import random
import re
import shutil
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

log = logging.getLogger(__name__)
STEP_RE = re.compile(r"^step_(\d+)$")


class TaskStream:
    """Seeded epochs over a fixed task list; its position is part of the trainer state."""

    def __init__(self, tasks: list[dict[str, Any]], batch_size: int, seed: int):
        if not tasks:
            raise ValueError("no training tasks: the env returned an empty train split")
        self.tasks, self.batch_size, self.seed = tasks, batch_size, seed
        self.epoch, self.pos = 0, 0
        self._order = self._perm()

    def _perm(self) -> list[int]:
        order = list(range(len(self.tasks)))
        random.Random(self.seed * 100_003 + self.epoch).shuffle(order)
        return order

    def next_batch(self) -> list[dict[str, Any]]:
        batch = []
        while len(batch) < self.batch_size:
            if self.pos >= len(self._order):
                self.epoch, self.pos = self.epoch + 1, 0
                self._order = self._perm()
            batch.append(self.tasks[self._order[self.pos]])
            self.pos += 1
        return batch

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.pos = state["epoch"], state["pos"]
        self._order = self._perm()


@dataclass
class TrainerState:
    step: int = 0
    data: dict[str, int] = field(default_factory=dict)
    buffer_total: int = 0
    rng: Optional[list] = None
    algo: dict[str, Any] = field(default_factory=dict)

    def capture_rng(self) -> None:
        state = random.getstate()
        self.rng = [state[0], list(state[1]), state[2]]

    def restore_rng(self) -> None:
        if self.rng:
            random.setstate((self.rng[0], tuple(self.rng[1]), self.rng[2]))


class CheckpointManager:
    def __init__(self, out_dir: str | os.PathLike, keep: int = 2):
        self.root = Path(out_dir) / "checkpoints"
        self.keep = keep

    def step_dirs(self) -> list[tuple[int, Path]]:
        if not self.root.is_dir():
            return []
        found = [(int(m.group(1)), p) for p in self.root.iterdir()
                 if (m := STEP_RE.match(p.name)) and (p / "trainer_state.json").is_file()]
        return sorted(found)

    def latest(self) -> Optional[Path]:
        dirs = self.step_dirs()
        return dirs[-1][1] if dirs else None

    def staging(self, step: int) -> Path:
        tmp = self.root / f"step_{step}.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        return tmp

    def commit(self, tmp: Path, step: int, state: TrainerState) -> Path:
        (tmp / "trainer_state.json").write_text(json.dumps(asdict(state)))
        final = self.root / f"step_{step}"
        if final.exists():  # a re-run of the same step after a resume: replace it
            shutil.rmtree(final)
        os.rename(tmp, final)
        for _, old in self.step_dirs()[: -self.keep]:
            shutil.rmtree(old, ignore_errors=True)
        log.info("checkpoint saved: %s", final)
        return final

    @staticmethod
    def load_state(ckpt: Path) -> TrainerState:
        return TrainerState(**json.loads((ckpt / "trainer_state.json").read_text()))
