"""`python -m marl_llm list` — what a run can be made of: algorithms, envs (with the columns a
dataset file needs), model presets and experiment presets, each with its one-line description."""
from __future__ import annotations

import re
import sys
from pathlib import Path
from typing import Optional

from marl_llm.config import conf_dir, import_plugins
from marl_llm.registry import ALGORITHMS, ENVS


def first_line(text: Optional[str]) -> str:
    return (text or "").strip().split("\n\n")[0].replace("\n", " ").strip()


def yaml_summary(path: Path) -> str:
    """The leading comment of a preset file (its description), without the `@package` line."""
    lines = []
    for line in path.read_text().splitlines():
        if not line.startswith("#"):
            break
        text = line.lstrip("#").strip()
        if text and not text.startswith("@package"):
            lines.append(text)
    first = re.split(r"(?<=[a-z0-9)])\. (?=[A-Z])", " ".join(lines))[0].rstrip(".")
    return first if len(first) <= 160 else first[:157] + "..."


def presets(group: str) -> dict[str, str]:
    return {p.stem: yaml_summary(p) for p in sorted((conf_dir() / group).glob("*.yaml"))}


def catalog() -> dict[str, dict[str, str]]:
    algos = {name: first_line(ALGORITHMS.get(name).__doc__ or sys.modules[ALGORITHMS.get(name).__module__].__doc__)
             for name in ALGORITHMS.names()}
    envs = {}
    for name in ENVS.names():
        cls = ENVS.get(name)
        cols = ", ".join(cls.columns) if cls.columns else "none (generated tasks)"
        yaml = conf_dir() / "env" / f"{name}.yaml"
        about = yaml_summary(yaml) if yaml.is_file() else first_line(sys.modules[cls.__module__].__doc__)
        envs[name] = f"{about} [columns: {cols}]"
    return {"algorithms (algo=)": algos, "environments (env=)": envs, "model presets (model=)": presets("model"),
            "experiments (+experiment=)": presets("experiment")}


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(__doc__.strip() + "\n\nusage: python -m marl_llm list [plugins=[module,...]]")
        return 0
    for a in argv:
        if a.startswith("plugins="):
            import_plugins([m for m in a.split("=", 1)[1].strip("[]").split(",") if m])
    for section, items in catalog().items():
        print(f"{section}:")
        width = max(map(len, items), default=0)
        for name, text in items.items():
            print(f"  {name:<{width}}  {text}")
    print("Datasets: docs/DATA.md (each env's columns; map yours with env.data.fields.<field>=<column>).")
    return 0


if __name__ == "__main__":
    sys.exit(main())
