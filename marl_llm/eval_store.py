"""What an evaluation leaves on disk, so a result can be re-read and paired across runs.

Every evaluation (the trainer's periodic dev ones in `<run>/eval/dev/step_<N>/`, its test one
after the last step in `<run>/eval/test/step_<N>/`, `marl_llm.evaluate` in `<run>/eval_<checkpoint>/`
or, with split=dev, `<run>/eval_<checkpoint>_dev/`) writes `outcomes.json`: the evaluated task ids
and, per metric, one outcome per task in that order. Two runs evaluated on the same tasks (e.g. the
same env and seed, two settings) are then compared task by task:

  python -m marl_llm compare outputs/run_k1 outputs/run_k0          # newest test evaluation of each
  python -m marl_llm compare A/eval/dev/step_24 B/eval/dev/step_24 metric=correct   # choose on dev

prints, for every metric both have, `A - B = +0.03 [-0.04, +0.10], n=200`: the paired difference
over the tasks both evaluated (matched by id) with its 95% interval (marl_llm.stats).

Replies: next to outcomes.json, `replies/<metric>.jsonl` (the metric's name with "/" as ".", e.g.
`replies/base.correct.jsonl`) holds the replies behind each metric the algorithm compares: one row
per task with `task_id`, `task`, `role`, `prompt`, `reply`, `temperature`, `seed`, `scored`, `score`
(the outcome logged), on an answer env the strict and lenient readings `answer` and
`lenient_answer` (and `lenient_score`), for a majority vote the `candidates` voted over
(algorithms/base.py `reply_rows`). outcomes.json names the files (`replies`: metric -> file) and says
how each metric's replies were decoded (`decoding`: metric -> "greedy", or "temperature T, seed S"
with S the run seed). Re-read and re-score them from Python, no command needed:

  from omegaconf import OmegaConf
  from envs.base import make_env
  from marl_llm.eval_store import read_replies, replies_path, rescore
  rows = read_replies("outputs/run/eval/test/step_24", "correct")       # list of dicts, one per task
  env = make_env(OmegaConf.load("outputs/run/config.yaml").env)
  rescore(replies_path("outputs/run/eval/test/step_24", "correct"), env)  # == [r["score"] for r in rows]

`rescore` recomputes each score from the saved task and reply with the env (a changed env or
reader re-scores the same replies); the answer env's outcomes also hold `lenient/<metric>` and
`noanswer/<metric>` (the share of replies with no readable answer).
"""
from __future__ import annotations

import json
import logging
import re
import sys
from pathlib import Path
from typing import Any, Mapping, Optional, Sequence

from marl_llm.config import ConfigError
from marl_llm.jsonl import read_jsonl, write_jsonl
from marl_llm.stats import Interval, paired_difference

log = logging.getLogger(__name__)
OUTCOMES = "outcomes.json"
REPLIES = "replies"  # the folder of the reply files, next to outcomes.json


def save_outcomes(folder: Path, task_ids: Sequence[str], outcomes: Mapping[str, Sequence[float]],
                  extra: Optional[Mapping[str, Any]] = None) -> Path:
    """`folder/outcomes.json` with the per-task outcomes of the metrics scored on every task
    (subset metrics, e.g. accuracy on the tasks where the team was all wrong, cannot be paired
    by position and are left out) and the `extra` keys (`decoding`, `replies`). Written to a
    temporary name first: a crash leaves no half file."""
    folder.mkdir(parents=True, exist_ok=True)
    ids = [str(i) for i in task_ids]
    kept = {k: [float(x) for x in v] for k, v in outcomes.items() if len(v) == len(ids)}
    path = folder / OUTCOMES
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps({"task_ids": ids, "outcomes": kept, **(extra or {})}))
    tmp.replace(path)
    return path


def replies_file(name: str) -> str:
    """The file name of metric `name`'s replies: "/" (and anything else unsafe in a file name) as "."."""
    return re.sub(r"[^A-Za-z0-9_-]+", ".", name).strip(".") + ".jsonl"


def save_replies(folder: Path, replies: Mapping[str, Sequence[Mapping[str, Any]]]) -> dict[str, str]:
    """`folder/replies/<file>.jsonl` per metric (`replies_file`); returns metric -> its path
    relative to `folder`. Reply files of an earlier evaluation in the folder that this one did not
    write are removed (outcomes.json's `replies` names the current ones)."""
    files = {name: f"{REPLIES}/{replies_file(name)}" for name in replies}
    clash = sorted(n for n in files if list(files.values()).count(files[n]) > 1)
    if clash:
        raise ValueError(f"metrics {clash} would share a replies file; rename one (file names replace '/' by '.')")
    for name, rows in replies.items():
        write_jsonl(folder / files[name], rows)
    for stale in set((folder / REPLIES).glob("*.jsonl")) - {folder / f for f in files.values()}:
        stale.unlink()
    return files


def save_evaluation(folder: Path, tasks: Sequence[Mapping], algo) -> Path:
    """What `algo.evaluate(tasks)` just scored, saved in `folder` (see the module docstring): the
    per-task outcomes, the kept replies (`algo.eval_replies`) and their decoding labels
    (`algo.eval_decoding()`)."""
    # an algorithm object that is not an `Algorithm` (a duck-typed plugin, a test's fake) keeps none
    files = save_replies(folder, getattr(algo, "eval_replies", {}))
    decoding = algo.eval_decoding() if callable(getattr(algo, "eval_decoding", None)) else {}
    if files:
        log.info("evaluation saved in %s: outcomes and the replies of %s (decoding: %s)", folder, ", ".join(files),
                 "; ".join(f"{k} {v}" for k, v in decoding.items()))
    return save_outcomes(folder, [t["id"] for t in tasks], algo.eval_outcomes,
                         {"decoding": decoding, REPLIES: files})


def replies_path(where: str | Path, name: str) -> Path:
    """The replies file of metric `name` in the evaluation `where` (an evaluation folder, its
    outcomes.json or a run folder, as `find_outcomes` reads it)."""
    path = find_outcomes(where)
    try:
        files = json.loads(path.read_text()).get(REPLIES) or {}
    except (OSError, ValueError, AttributeError) as e:
        raise ConfigError(f"{path} is not an outcomes file ({type(e).__name__}: {e})") from None
    if name not in files:
        raise ConfigError(f"{path.parent} has no replies of metric {name!r}; it has replies of {sorted(files)} "
                          "(evaluations saved before replies were kept have none)")
    return path.parent / files[name]


def read_replies(where: str | Path, name: str) -> list[dict[str, Any]]:
    """The saved reply rows of metric `name` in the evaluation `where` (`replies_path`)."""
    return read_jsonl(replies_path(where, name), f"replies of {name!r}")


def reply_outputs(row: Mapping[str, Any]) -> dict[str, str]:
    """A reply row's outputs as the env's reward takes them: role -> text (a joint row has several)."""
    return dict(row["reply"]) if isinstance(row["reply"], Mapping) else {row["role"]: row["reply"]}


def rescore(path: str | Path, env) -> list[float]:
    """The score of every row of a replies file, recomputed with `env` from the row's task and
    reply as the evaluation scored it (`scored`: the reward's total, or a component such as
    correctness: `algorithms.base.score_of`). With the run's env this is the rows' `score`."""
    from algorithms.base import score_of  # the algorithms' own rule; marl_llm imports no plugin at load time

    rows = read_jsonl(path, "replies file")
    rewards = env.reward_batch([(row["task"], reply_outputs(row)) for row in rows])
    return [score_of(r, row["scored"], env.max_reward) for row, r in zip(rows, rewards)]


def _step_of(path: Path) -> int:
    m = re.search(r"(\d+)$", path.name)
    return int(m.group(1)) if m else -1


def find_outcomes(where: str | Path) -> Path:
    """The outcomes file of `where`: the file itself, an evaluation folder, or a run folder (its
    newest test evaluation `eval/test/step_<N>`, else its newest dev evaluation `eval/dev/step_<N>`,
    else its newest `eval_<checkpoint>`)."""
    p = Path(where)
    if p.is_file():
        return p
    if (p / OUTCOMES).is_file():
        return p / OUTCOMES
    for pattern in ("eval/test/step_*", "eval/dev/step_*", "eval_*"):
        found = sorted((d for d in p.glob(pattern) if (d / OUTCOMES).is_file()), key=_step_of)
        if found:
            return found[-1] / OUTCOMES
    raise ConfigError(f"{str(p)!r} has no evaluation outcomes ({OUTCOMES} in the folder, in <run>/eval/test/step_<N>/, "
                      "<run>/eval/dev/step_<N>/ or <run>/eval_<checkpoint>/); runs evaluated before per-task outcomes "
                      "were saved have none")


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
