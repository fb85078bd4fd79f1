"""What each config key means, read from the dataclasses themselves (the one source of config).

A field's description is the comment on its line (`lr: float = 5e-5  # ...`) or the comment lines
right above it; `#:` works too. `keys(run)` lists every key of a validated run with its type,
value and description (what `--help` prints), and `nearest(key, run)` answers a misspelt key.
"""
from __future__ import annotations

import ast
import dataclasses
import difflib
import inspect
import textwrap
import io
import tokenize
from functools import lru_cache
from typing import Any, Iterator


@lru_cache(maxsize=None)
def _own_docs(cls: type) -> dict[str, str]:
    """Field name -> comment, for the fields written in `cls`'s own class body."""
    try:
        source = textwrap.dedent(inspect.getsource(cls))
    except (OSError, TypeError):  # built in a REPL or generated: no source to read
        return {}
    lines = source.splitlines()
    node = ast.parse(source).body[0]
    docs: dict[str, str] = {}
    for stmt in node.body:
        if not (isinstance(stmt, ast.AnnAssign) and isinstance(stmt.target, ast.Name)):
            continue
        i = stmt.lineno - 1
        text = _trailing_comment(lines[i])
        if not text:  # the comment lines right above (not a ---- section rule ----)
            above: list[str] = []
            for prev in reversed(lines[:i]):
                s = prev.strip()
                if not s.startswith("#") or set(s.lstrip("#:").strip()) <= set("-= "):
                    break
                above.insert(0, s.lstrip("#:").strip())
            text = " ".join(above)
        if text:
            docs[stmt.target.id] = text
    return docs


def _trailing_comment(line: str) -> str:
    try:
        toks = list(tokenize.generate_tokens(io.StringIO(line.strip() + "\n").readline))
    except (tokenize.TokenError, SyntaxError):  # a field spread over lines
        return ""
    return next((t.string.lstrip("#:").strip() for t in toks if t.type == tokenize.COMMENT), "")


def field_docs(cls: type) -> dict[str, str]:
    """Field name -> description, inherited ones included (a subclass's comment wins)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            docs.update(_own_docs(klass))
    return docs


def _type_name(t: Any) -> str:
    """Annotations are strings under `from __future__ import annotations`."""
    return (t if isinstance(t, str) else getattr(t, "__name__", str(t))).replace("typing.", "")


def keys(obj: Any, prefix: str = "") -> Iterator[tuple[str, str, Any, str]]:
    """(dotted key, type, value, description) for every leaf field of a dataclass tree; a nested
    dataclass (e.g. `env.data`) is walked, a dict or list is one key."""
    docs = field_docs(type(obj))
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            yield from keys(value, key + ".")
        else:
            yield key, _type_name(f.type), value, docs.get(f.name, "")


def nearest(key: str, valid: list[str], n: int = 3) -> list[str]:
    """The valid keys closest to a misspelt `key` (its own group first)."""
    group = key.split(".", 1)[0]
    same = [k for k in valid if k.startswith(group + ".")]
    for pool in (same, valid):
        scored = sorted(((difflib.SequenceMatcher(None, key, k).ratio(), k) for k in pool), reverse=True)
        found = [k for r, k in scored[:n] if r >= max(0.6, scored[0][0] - 0.05)] if scored else []
        if found:
            return found
    # the last part alone: `trainer.stepz` -> `trainer.steps`, `lr` -> `learner.lr`
    last = key.rsplit(".", 1)[-1]
    by_last: dict[str, list[str]] = {}
    for k in same or valid:
        by_last.setdefault(k.rsplit(".", 1)[-1], []).append(k)
    return [k for m in difflib.get_close_matches(last, list(by_last), n=n, cutoff=0.75) for k in by_last[m]][:n]


def did_you_mean(key: str, valid: list[str]) -> str:
    found = nearest(key, valid)
    return f"did you mean {' or '.join(found)}?" if found else "python -m marl_llm.train --help lists the keys"


def flat_keys(node: Any, prefix: str = "") -> list[str]:
    """Dotted leaf keys of a plain or OmegaConf mapping (dicts inside are walked)."""
    out = []
    for k, v in node.items():
        key = f"{prefix}{k}"
        if hasattr(v, "items") and v:
            out += flat_keys(v, key + ".")
        else:
            out.append(key)
    return out


def _show(value: Any) -> str:
    text = repr(value) if isinstance(value, str) else str(value)
    return text if len(text) <= 60 else text[:57] + "..."


def key_table(run: Any, prefix: str = "") -> str:
    """Every key of a validated run (or one group's Config with its `prefix`): `key = value
    (type) description`, grouped by config group."""
    rows = list(keys(run, prefix))
    width = min(max(len(f"{k} = {_show(v)}") for k, _, v, _ in rows), 64)
    out, group = [], None
    for key, typ, value, doc in rows:
        if key.split(".", 1)[0] != group:
            group = key.split(".", 1)[0]
            out.append("")
        out.append(f"  {f'{key} = {_show(value)}':<{width}}  ({typ}) {doc}".rstrip())
    return "\n".join(out)


def group_options() -> str:
    """The options of each config group (`algo=`, `env=`, ...), from the config folder."""
    from marl_llm.config import conf_dir

    root = conf_dir()
    lines = []
    for group in sorted(p.name for p in root.iterdir() if p.is_dir()):
        names = sorted(p.stem for p in (root / group).glob("*.yaml"))
        prefix = "+" if group == "experiment" else ""
        lines.append(f"  {prefix}{group}=: {', '.join(names)}")
    return "\n".join(lines)
