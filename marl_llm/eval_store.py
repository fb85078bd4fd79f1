"""What an evaluation leaves on disk, so a result can be re-read and paired across runs.

Every evaluation (the trainer's periodic ones in `<run>/eval/step_<N>/`, `marl_llm.evaluate` in
`<run>/eval_<checkpoint>/`) writes `outcomes.json`: the evaluated task ids and, per metric, one
outcome per task in that order. Two runs evaluated on the same tasks (e.g. the same env and seed,
two settings) are then compared task by task:

  python -m marl_llm compare outputs/run_k1 outputs/run_k0          # newest evaluation of each
  python -m marl_llm compare A/eval/step_24 B/eval/step_24 metric=correct

prints, for every metric both have, `A - B = +0.03 [-0.04, +0.10], n=200`: the paired difference
over the tasks both evaluated (matched by id) with its 95% interval (marl_llm.stats).
"""
from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Mapping, Sequence

from marl_llm.config import ConfigError
from marl_llm.stats import Interval, paired_difference

OUTCOMES = "outcomes.json"


def save_outcomes(folder: Path, task_ids: Sequence[str], outcomes: Mapping[str, Sequence[float]]) -> Path:
    """`folder/outcomes.json` with the per-task outcomes of the metrics scored on every task
    (subset metrics, e.g. accuracy on the tasks where the team was all wrong, cannot be paired
    by position and are left out). Written to a temporary name first: a crash leaves no half file."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in task_ids]
    kept = {k: [float(x) for x in v] for k, v in outcomes.items() if len(v) == len(ids)}
    path = folder / OUTCOMES
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"task_ids": ids, "outcomes": kept}))
    tmp.replace(path)
    return path


def save_evaluation(folder: Path, tasks: Sequence[Mapping], algo) -> Path:
    """What `algo.evaluate(tasks)` just scored, saved in `folder` (see the module docstring)."""
    return save_outcomes(folder, [t["id"] for t in tasks], algo.eval_outcomes)


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name)
    return int(m.group(1)) if m else -1


def find_outcomes(where: str | Path) -> Path:
    """The outcomes file of `where`: the file itself, an evaluation folder, or a run folder (its
    newest periodic evaluation `eval/step_<N>`, else its newest `eval_<checkpoint>`)."""
    p = Path(where)
    if p.is_file():
        return p
    if (p / OUTCOMES).is_file():
        return p / OUTCOMES
    found = sorted((d for d in (p / "eval").glob("step_*") if (d / OUTCOMES).is_file()), key=_step_of)
    found = found or sorted((d for d in p.glob("eval_*") if (d / OUTCOMES).is_file()), key=_step_of)
    if not found:
        raise ConfigError(f"{str(p)!r} has no evaluation outcomes ({OUTCOMES} in the folder, in <run>/eval/step_<N>/ "
                          "or <run>/eval_<checkpoint>/); runs evaluated before per-task outcomes were saved have none")
    return found[-1] / OUTCOMES


def load_outcomes(where: str | Path) -> tuple[list[str], dict[str, list[float]]]:
    path = find_outcomes(where)
    try:
        data = json.loads(path.read_text())
        return [str(i) for i in data["task_ids"]], {k: list(v) for k, v in data["outcomes"].items()}
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise ConfigError(f"{path} is not an outcomes file ({type(e).__name__}: {e})") from None


def compare(a: str | Path, b: str | Path, metrics: Sequence[str] = ()) -> dict[str, Interval]:
    """Metric -> the paired difference a - b over the tasks both evaluated (matched by id)."""
    ids_a, out_a = load_outcomes(a)
    ids_b, out_b = load_outcomes(b)
    pos_b = {t: i for i, t in enumerate(ids_b)}
    common = [(i, pos_b[t]) for i, t in enumerate(ids_a) if t in pos_b]
    if not common:
        raise ConfigError(f"{a} and {b} evaluated no task in common (different env, split or seed?)")
    names = [m for m in out_a if m in out_b]
    missing = [m for m in metrics if m not in names]
    if missing:
        raise ConfigError(f"metric(s) {missing} are not in both evaluations; both have {names}")
    return {m: paired_difference([out_a[m][i] for i, _ in common], [out_b[m][j] for _, j in common])
            for m in (metrics or names)}


def main(argv: list[str] | None = None) -> int:
    from marl_llm import cli

    argv = sys.argv[1:] if argv is None else argv
    if any(a in ("-h", "--help") for a in argv):
        print(__doc__.strip())
        return 0
    with cli.reported():
        metrics = [a.split("=", 1)[1] for a in argv if a.startswith("metric=")]
        paths = [a for a in argv if not a.startswith("metric=")]
        if len(paths) != 2:
            raise ConfigError(f"compare takes two runs or evaluation folders (A B) and optional metric=NAME; got {paths}")
        diffs = compare(paths[0], paths[1], metrics)
    a, b = paths
    print(f"A = {find_outcomes(a)}\nB = {find_outcomes(b)}\npaired differences A - B (95% intervals, tasks matched by id):")
    width = max(map(len, diffs))
    for name, iv in diffs.items():
        print(f"  {name:<{width}}  {iv}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
