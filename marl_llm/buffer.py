"""TrajectoryBuffer: the one store every algorithm writes episodes to.

Episodes are appended as they are collected and persisted as JSONL (one episode per line,
append-only, flushed per batch) so that a crash never loses what was already collected and the
file can be inspected offline with `jq` or loaded with `datasets.load_dataset("json", ...)`.
"""
from __future__ import annotations

import json
import os
from collections import defaultdict
from pathlib import Path
from typing import Callable, Iterable, Iterator

from marl_llm.types import Episode, Turn


class TrajectoryBuffer:
    def __init__(self, path: str | os.PathLike | None = None, keep_last: int | None = None):
        """`path`: the JSONL file to append to (None keeps episodes in memory only).
        `keep_last`: how many episodes stay in memory (all are always on disk)."""
        self.path = Path(path) if path else None
        self.keep_last = keep_last
        self.episodes: list[Episode] = []
        self.total = 0

    def add(self, episodes: Iterable[Episode]) -> None:
        episodes = list(episodes)
        if self.path is not None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                for ep in episodes:
                    f.write(json.dumps(ep.to_dict()) + "\n")
                f.flush()
                os.fsync(f.fileno())
        self.episodes.extend(episodes)
        self.total += len(episodes)
        if self.keep_last is not None and len(self.episodes) > self.keep_last:
            del self.episodes[: len(self.episodes) - self.keep_last]

    def __len__(self) -> int:
        return len(self.episodes)

    def __iter__(self) -> Iterator[Episode]:
        return iter(self.episodes)

    def filter(self, pred: Callable[[Episode], bool]) -> list[Episode]:
        return [ep for ep in self.episodes if pred(ep)]

    def turns_by_policy(self, episodes: Iterable[Episode] | None = None) -> dict[str, list[Turn]]:
        out: dict[str, list[Turn]] = defaultdict(list)
        for ep in self.episodes if episodes is None else episodes:
            for t in ep.turns:
                out[t.policy].append(t)
        return dict(out)

    def truncate_to(self, total: int) -> None:
        """Drop episodes written after a checkpoint (resume restores the buffer to that point)."""
        if self.path is None or not self.path.exists():
            return
        with open(self.path) as f:
            lines = f.readlines()
        if len(lines) > total:
            tmp = self.path.with_suffix(".tmp")
            tmp.write_text("".join(lines[:total]))
            os.replace(tmp, self.path)

    def read(self) -> Iterator[Episode]:
        """Every episode written so far, oldest first: the file's (all of them, also those beyond
        `keep_last`) or, for an in-memory buffer, the ones held. Read lazily, line by line."""
        if self.path is not None and self.path.exists():
            return _read_jsonl(self.path)
        return iter(list(self.episodes))

    @classmethod
    def load(cls, path: str | os.PathLike, keep_last: int | None = None) -> "TrajectoryBuffer":
        buf = cls(path, keep_last=keep_last)
        if buf.path.exists():
            for ep in _read_jsonl(buf.path):
                buf.episodes.append(ep)
                buf.total += 1
            if keep_last is not None:
                buf.episodes = buf.episodes[-keep_last:]
        return buf


def _read_jsonl(path: Path) -> Iterator[Episode]:
    with open(path) as f:
        for line_no, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                yield Episode.from_dict(json.loads(line))
            except (json.JSONDecodeError, TypeError) as e:
                raise ValueError(f"{path}:{line_no}: not a trajectory-buffer episode ({e})") from e
