"""JSON Lines files: one JSON object per line (datasets, exports, the stored training tasks).

One reader and one writer for every such file the framework and the algorithms keep; the
trajectory buffer streams its own (it appends and truncates in place)."""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Iterable

from marl_llm.config import ConfigError


def read_jsonl(path: str | os.PathLike, what: str, error: type[Exception] = ConfigError) -> list[dict[str, Any]]:
    """The rows of a JSONL file; blank lines are skipped. A missing file, a line that is not
    JSON or not a JSON object raises `error` naming `what` (e.g. "algo.sft_file"), the file and
    the line number."""
    p = Path(path)
    if not p.is_file():
        raise error(f"{what}={str(path)!r} does not exist (expected a JSONL file: one JSON object per line)")
    rows = []
    with open(p, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                raise error(f"{what}: {path} line {n} is not valid JSON ({e.msg}); give one JSON object per line") \
                    from None
            if not isinstance(row, dict):
                raise error(f"{what}: {path} line {n} is a {type(row).__name__}, not a JSON object; "
                            "give one JSON object per line")
            rows.append(row)
    return rows


def write_jsonl(path: str | os.PathLike, rows: Iterable[dict[str, Any]]) -> Path:
    """Write `rows` as JSONL atomically (a temp file renamed into place: a crash mid-write
    leaves the previous file whole); parent folders are made."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    os.replace(tmp, path)
    return path
