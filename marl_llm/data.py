"""Loading an env's tasks from a `DataConfig`: a local file/folder or a Hugging Face Hub dataset.

Rules (shared by every env):
- `path` (a local .jsonl/.json/.parquet/.csv file, or a folder of them) wins over `hub_id`; both
  are read through Hugging Face `datasets`. A missing path raises DataNotFound (a DataError and a
  FileNotFoundError) naming it; a file that does not parse or holds no rows raises DataError.
- `hub_id` (+ `hub_config`, `split`) loads from the Hub; when that fails (offline, unknown id) the
  error says so and tells the user to pass `env.data.path=...`.
- `fields` maps task field -> dataset column; it is merged over the env's defaults. A missing
  column raises DataError naming the field, the column and the columns that exist.
- Eval tasks (the env's test split) come from `eval_split` when it is given and exists; otherwise
  `eval_size` tasks are held out of the train split, chosen by a seeded shuffle. Train and eval
  never overlap. A local single file has one split ("train"): a configured `eval_split` that it
  does not have falls back to the seeded hold-out. The dev split is carved out of the train tasks
  afterwards, by the Env (`env.dev_size`, envs/base.py).
- `limit` caps each of the two lists (after splitting, so they stay disjoint).
- Prompts that do not fit the model (`fit_prompts`, called by the pre-flight check before any
  engine starts): a task whose first-turn prompt is longer than `model.max_model_len -
  rollout.max_new_tokens` tokens is dropped, with a logged count; `env.data.long_prompts=truncate`
  keeps it with its longest text field cut to fit. No task left is a DataError.
"""
from __future__ import annotations

import json
import logging
import os
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

from marl_llm.jsonl import read_jsonl

log = logging.getLogger(__name__)

_EXT_BUILDER = {".jsonl": "json", ".json": "json", ".parquet": "parquet", ".csv": "csv"}


class DataError(ValueError):
    """A data source that cannot be used; the message names the value and what is allowed."""


class DataNotFound(DataError, FileNotFoundError):
    """`env.data.path` does not exist."""


@dataclass
class Splits:
    train: list[dict[str, Any]]
    eval: list[dict[str, Any]]
    source: str


def _builder_for(files: list[Path]) -> str:
    kinds = {_EXT_BUILDER.get(_suffix(f)) for f in files}
    kinds.discard(None)
    if len(kinds) != 1:
        raise DataError(
            f"cannot tell the format of {[str(f) for f in files]}; use .jsonl, .json, .parquet or .csv files "
            "(one format per folder)")
    return kinds.pop()


def _suffix(f: Path) -> str:
    name = f.name.lower()
    for ext in (".jsonl", ".json", ".parquet", ".csv"):
        if name.endswith(ext):
            return ext
    return f.suffix.lower()


def _local_splits(path: str, subset: Optional[str] = None) -> dict[str, Any]:
    """Split name -> datasets.Dataset for a local file or folder (a folder's `subset` subfolder,
    e.g. a Hub snapshot's config folder, is used when it exists)."""
    import datasets

    p = Path(os.path.expanduser(path))
    if not p.exists():
        raise DataNotFound(f"env.data.path={path!r} does not exist (resolved to {p.resolve()}); "
                           "give an existing .jsonl/.json/.parquet/.csv file or a folder of them")
    if p.is_dir() and subset and (p / subset).is_dir():
        p = p / subset
    if p.is_file():
        files = {"train": [p]}
    else:
        found = sorted(f for f in p.rglob("*") if f.is_file() and _suffix(f) in _EXT_BUILDER)
        if not found:
            raise DataError(f"env.data.path={path!r} is a folder with no .jsonl/.json/.parquet/.csv files")
        files: dict[str, list[Path]] = {}
        for f in found:
            stem = f.name[: -len(_suffix(f))]
            # train.jsonl, test-00000-of-00001.parquet, data/validation.jsonl ...
            split = stem.split("-")[0].split(".")[0] or "train"
            files.setdefault(split, []).append(f)
        known = {"train", "test", "validation", "val", "dev", "valid", "eval"}
        if not set(files) & known:  # arbitrary file names: all of it is the train split
            files = {"train": found}
    builder = _builder_for([f for fs in files.values() for f in fs])
    if all(f.stat().st_size == 0 for fs in files.values() for f in fs):
        raise DataError(f"env.data.path={path!r} is empty; give a file with at least one task")
    if builder == "json":
        for f in (f for fs in files.values() for f in fs if _suffix(f) == ".jsonl"):
            read_jsonl(f, f"env.data.path={path!r}", DataError)  # datasets' own error names no line
    data_files = {k: [str(f) for f in v] for k, v in files.items()}
    quiet = datasets.utils.logging.is_progress_bar_enabled()
    verbosity = datasets.utils.logging.get_verbosity()
    if quiet:
        datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity(logging.CRITICAL)  # its parse errors repeat what DataError says
    try:
        dd = datasets.load_dataset(builder, data_files=data_files)
    except Exception as e:  # noqa: BLE001 - re-raised with the path named
        raise DataError(f"could not read env.data.path={path!r} as {builder} ({_root_cause(e)}); "
                        f"give a valid {builder} file (jsonl: one JSON object per line)") from e
    finally:
        datasets.utils.logging.set_verbosity(verbosity)
        if quiet:
            datasets.enable_progress_bars()
    return dict(dd)


def _root_cause(e: BaseException) -> str:
    """The first line of the innermost exception (datasets wraps parse errors in generic ones)."""
    while e.__cause__ is not None or e.__context__ is not None:
        e = e.__cause__ or e.__context__
    text = str(e).strip()
    return f"{type(e).__name__}: {text.splitlines()[0]}" if text else type(e).__name__


def hub_offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on")


def _hub_split(hub_id: str, hub_config: Optional[str], split: str):
    import datasets

    try:
        return datasets.load_dataset(hub_id, hub_config, split=split)
    except Exception as e:  # noqa: BLE001 - offline or unknown id: one clear message
        offline = hub_offline()
        raise DataError(
            f"could not load Hugging Face dataset {hub_id!r} (config {hub_config!r}, split {split!r})"
            f"{' with HF_HUB_OFFLINE=1' if offline else ''}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}. "
            "Without Hub access, download the data elsewhere and pass env.data.path=<local .jsonl/.parquet "
            "file or folder> (set env.data.fields.<task_field>=<column> if its columns differ).") from e


def _jsonable(v: Any) -> Any:
    try:
        json.dumps(v)
        return v
    except TypeError:
        return json.loads(json.dumps(v, default=str))


def map_fields(rows, mapping: dict[str, str], source: str, required: tuple[str, ...] = ()) -> list[dict[str, Any]]:
    """Rows (a Dataset or list of dicts) -> task dicts with `mapping` (task field -> column) applied.

    Every task field in `required` must resolve to a column (through `mapping`, else a column of
    the same name). Mapped optional fields whose column is absent are set to None. Unmapped
    columns are kept under their own names unless a task field already uses the name.
    """
    columns = list(rows.column_names) if hasattr(rows, "column_names") else (list(rows[0]) if len(rows) else [])
    resolved = {tf: mapping.get(tf, tf) for tf in required}
    resolved.update(mapping)
    missing = [(tf, col) for tf, col in resolved.items() if tf in required and col not in columns]
    used = set(resolved.values())
    if missing and len(rows):
        desc = ", ".join(f"task field {tf!r} <- column {col!r}" for tf, col in missing)
        raise DataError(
            f"{source}: column(s) not found: {desc}. Columns that exist: {columns}. "
            f"Map them with env.data.fields.<task_field>=<column>, "
            f"e.g. env.data.fields.{missing[0][0]}={next((c for c in columns if c not in used), 'COLUMN')}")
    out = []
    for row in rows:
        task = {tf: (_jsonable(row[col]) if col in columns else None) for tf, col in resolved.items()}
        for col in columns:
            if col not in task and col not in used:
                task[col] = _jsonable(row[col])
        out.append(task)
    return out


def holdout(n: int, eval_size: int, seed: int) -> tuple[list[int], list[int]]:
    """Deterministic disjoint (train, eval) index lists: `eval_size` indices held out by a seeded shuffle."""
    if eval_size < 0:
        raise DataError(f"env.data.eval_size={eval_size} must be >= 0")
    k = min(eval_size, n // 2)
    if k < eval_size:
        log.warning("eval_size=%d is more than half of the %d tasks; holding out %d instead", eval_size, n, k)
    order = list(range(n))
    random.Random(f"marl_llm-holdout-{seed}").shuffle(order)
    ev = sorted(order[:k])
    held = set(ev)
    return [i for i in range(n) if i not in held], ev


def load_splits(dc, *, default_fields: Optional[dict[str, str]] = None, required: tuple[str, ...] = (),
                seed: int = 0, id_prefix: str = "task",
                id_fn: Optional[Callable[[dict[str, Any], str, int], str]] = None) -> Splits:
    """Train and eval task dicts from a DataConfig (see the module docstring for the rules).

    Every task gets an `id` (an `id` column if the data has one, else `<prefix>-<split>-<row>`).
    """
    mapping = dict(default_fields or {})
    mapping.update({k: v for k, v in (dc.fields or {}).items() if v is not None})
    if dc.path:
        splits = _local_splits(dc.path, dc.hub_config)
        source = f"env.data.path={dc.path!r}"
        train_name = dc.split if dc.split in splits else ("train" if "train" in splits else None)
        if train_name is None:
            if len(splits) == 1:
                train_name = next(iter(splits))
            else:
                raise DataError(f"{source} has splits {sorted(splits)}; env.data.split={dc.split!r} is not one of them")
        train_rows = splits[train_name]
        eval_rows = None
        if dc.eval_split:
            if dc.eval_split in splits and dc.eval_split != train_name:
                eval_rows = splits[dc.eval_split]
            else:
                log.info("%s has no split %r; holding out %d train tasks for eval", source, dc.eval_split, dc.eval_size)
        split_names = (train_name, dc.eval_split)
    elif dc.hub_id:
        source = f"Hugging Face dataset {dc.hub_id!r}" + (f" ({dc.hub_config})" if dc.hub_config else "")
        train_rows = _hub_split(dc.hub_id, dc.hub_config, dc.split)
        eval_rows = _hub_split(dc.hub_id, dc.hub_config, dc.eval_split) if dc.eval_split else None
        split_names = (dc.split, dc.eval_split)
    else:
        raise DataError("this env needs data: set env.data.path=<local file or folder> or env.data.hub_id=<Hub id>")

    if len(train_rows) == 0:
        raise DataError(f"{source} holds no rows in split {split_names[0]!r}; give a dataset with at least one task")
    train = map_fields(train_rows, mapping, source, required)
    _assign_ids(train, split_names[0], id_prefix, id_fn)
    if eval_rows is not None:
        ev = map_fields(eval_rows, mapping, source, required)
        _assign_ids(ev, split_names[1], id_prefix, id_fn)
        seen = {t["id"] for t in train}
        if any(t["id"] in seen for t in ev):  # ids collide across splits: make them distinct
            for t in ev:
                t["id"] = f"{split_names[1]}:{t['id']}"
    else:
        tr_idx, ev_idx = holdout(len(train), dc.eval_size, seed)
        ev = [train[i] for i in ev_idx]
        train = [train[i] for i in tr_idx]
    if dc.limit is not None:
        if dc.limit < 0:
            raise DataError(f"env.data.limit={dc.limit} must be >= 0")
        train, ev = train[: dc.limit], ev[: dc.limit]
    return Splits(train=train, eval=ev, source=source)


def _assign_ids(tasks: list[dict[str, Any]], split: Optional[str], prefix: str, id_fn) -> None:
    seen: set[str] = set()
    for i, t in enumerate(tasks):
        if id_fn is not None:
            tid = id_fn(t, split or "train", i)
        elif t.get("id") is not None and str(t["id"]) not in seen:
            tid = str(t["id"])
        elif t.get("task_id") is not None and str(t["task_id"]) not in seen:
            tid = str(t["task_id"])
        else:
            tid = f"{prefix}-{split or 'train'}-{i}"
        if tid in seen:
            tid = f"{tid}#{i}"
        seen.add(tid)
        t["id"] = tid


def fit_prompts(tasks: list[dict[str, Any]], prompts: Callable[[dict[str, Any]], list[list[dict[str, str]]]],
                tokenizer, limit: int, mode: str, what: str) -> list[dict[str, Any]]:
    """The tasks whose every first-turn prompt (`prompts(task)`: chat messages per role, templated
    with `tokenizer`) fits in `limit` tokens.

    mode "drop": longer ones are left out; "truncate": the longest string field of the task that
    appears in the prompt is cut (by tokens, from the end) until the prompt fits. The counts are
    logged; an empty result is a DataError naming the limit and what to change.
    """
    from marl_llm.rollout.worker import prompt_ids_of
    from marl_llm.types import GenerationRequest

    def length(task) -> int:
        return max(len(prompt_ids_of(tokenizer, GenerationRequest(messages=m))) for m in prompts(task))

    kept, dropped, cut, longest = [], 0, 0, 0
    for task in tasks:
        n = length(task)
        longest = max(longest, n)
        if n <= limit:
            kept.append(task)
        elif mode == "truncate" and (short := _truncated(task, n, limit, length, prompts, tokenizer)) is not None:
            kept.append(short)
            cut += 1
        else:
            dropped += 1
    if dropped:
        log.warning("%s: dropped %d of %d tasks whose prompt is longer than %d tokens "
                    "(model.max_model_len - rollout.max_new_tokens)%s", what, dropped, len(tasks), limit,
                    "" if mode == "truncate" else "; env.data.long_prompts=truncate keeps them, cut to fit")
    if cut:
        log.warning("%s: cut the longest prompt field of %d of %d tasks to fit %d prompt tokens",
                    what, cut, len(tasks), limit)
    if tasks and not kept:
        raise DataError(f"{what}: none of the {len(tasks)} tasks has a prompt that fits in {limit} tokens "
                        f"(model.max_model_len - rollout.max_new_tokens; the longest prompt has {longest}); "
                        "raise model.max_model_len, lower rollout.max_new_tokens or set env.data.long_prompts=truncate")
    return kept


def _truncated(task, n: int, limit: int, length, prompts, tokenizer) -> Optional[dict[str, Any]]:
    """`task` with its longest prompt field cut until the prompt fits, or None if that cannot work."""
    task = dict(task)
    for _ in range(8):  # the template adds tokens around the field: a few rounds converge
        text = "\n".join(m["content"] for ms in prompts(task) for m in ms)
        fields = [k for k, v in task.items() if k != "id" and isinstance(v, str) and v.strip() and v.strip() in text]
        if not fields:
            return None
        key = max(fields, key=lambda k: len(task[k]))
        ids = tokenizer(task[key], add_special_tokens=False)["input_ids"]
        keep = len(ids) - (n - limit) - 4  # slack for tokens that merge differently at the cut
        if keep <= 0:
            return None
        task[key] = tokenizer.decode(ids[:keep])
        n = length(task)
        if n <= limit:
            return task
    return None
