"""A run's story in pictures: `python -m marl_llm.report run_dir=R [run_dir=R2 ...] [out=DIR]`.

Writes a self-contained folder (default `<first run_dir>/report/`): `index.html` (no server, no
JavaScript, opens offline) and the PNG figures it shows, drawn with matplotlib's Agg canvas:

- `comparison.png`: the run's final evaluation (`test/<name>` when logged, else the last step's
  `eval/<name>`): each policy's score as a point with its 95% interval (`<name>/ci_low|ci_high`,
  the convention of `marl_llm.stats`; a point alone without them), its baselines (`baselines`)
  hollow right below it, n in the label; one axis per scale (rates: estimates in 0..1 and not a
  reward, together on 0..1; any other family, e.g. reward, on its own). With several runs, one
  axis per run and scale.
- `forest.png`: every paired difference `diff/<a>-<b>` of that evaluation as a row `a - b (n=..)`:
  the estimate and its 95% interval around a line at 0, filled when the interval excludes 0.
- `reward.png`: training reward per step, raw (thin) and smoothed (thick: centred moving mean
  over about max(3, n/10) steps, drawn from 5 steps on). Panel "reward": `reward/mean` and every other
  `reward/<x>` except `reward/max` (the algorithm's subsets of its episodes, e.g. with / without a
  team, per turn); panel "reward components": the `reward/<c>` whose `c` is a component of the
  episodes in buffer.jsonl (a sole component equal to the total is not repeated).
- `agents.png`: one line per agent / role / policy: every metric family whose key holds an
  agent, role or policy name seen in buffer.jsonl in one of its segments (e.g. `agent1/loss`,
  `tree/value/generator`, `verifier/dpo_loss`) and whose name ends in
  reward, value, correct or loss.
- `eval.png` (only with more than one evaluation step: a single one is comparison.png's):
  `eval/<name>` per evaluation step with the interval `eval/<name>/ci_low|ci_high`
  when logged, one panel per metric (a key's first segment:
  `acc/final` and `acc/round0` share the panel `acc`); the algorithm's baselines (learnt from the
  comparisons it declared: `baselines`) are reference lines in the panel of the metric they
  compare with (dashed; horizontal when constant). Cost keys (gens, tokens, latency_s) are left to the summary table.
- `time.png`: seconds per step stacked by phase (`time/<phase>`; "other" is `time/step` minus
  the phases); one-off phases (setup, prepare and what only happens with them) go to the caption.
- `timeline.png`: per run, one bar per step and phase from `span/<phase>/start|end` (rollout,
  learner, push, evaluation/checkpoint lanes): where generation and training overlap
  (`trainer.max_staleness >= 1`) and where a side is idle.
- `throughput.png`: logged `*tokens_per_s` and the learner's tokens/s derived as the step's
  `n_tokens` (summed over policies) / `time/train`.

With several run_dirs every figure overlays the runs, one colour per run (each group of lines
then becomes one panel per line, and `time.png` one panel per run); a run's label is its
config.yaml's keys that differ from the other runs' (its folder name when none differ).

A run folder is one with config.yaml or metrics.jsonl. Missing or partial files (a crashed run: no
summary.json, a cut last line) give a report of what exists, with the reason shown as a note; a
folder that is not a run gives a one-line `error: ...` and exit code 2.
"""
from __future__ import annotations

import html
import json
import math
import re
import sys
from dataclasses import dataclass, field, replace
from datetime import datetime
from pathlib import Path
from typing import Any, Iterator, Optional

import yaml
from matplotlib import colormaps
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from marl_llm.stats import CI_HIGH, CI_LOW, CI_N, DIFF, Interval, diff_pair, interval_from_metrics

WIDTH_IN, ROW_IN, DPI = 10.0, 3.2, 100      # every PNG is 1000 px wide, 320 px per row of panels
MAX_PANELS = 12
MAX_BARS = 100                               # time.png: stacked bars up to this many steps, areas beyond
ONE_OFF_PHASES = ("setup", "prepare")        # the trainer times these once, before the first step
SUFFIXES = (CI_LOW, CI_HIGH, CI_N)           # marl_llm.stats: eval/<name>/ci_low|ci_high|n
EVAL_PREFIXES = ("eval/", "test/")           # the periodic evaluations, the final one on the test split
COST = re.compile(r"(^|/)(gens|tokens|latency_s|tokens_per_s|generations_per_question)(/|$)")
PER_AGENT_METRIC = re.compile(r"(reward|value|correct|loss)$")
LEARNER_TOKENS = "learner tokens/s"          # derived: n_tokens / time/train
WALL = "time/wall"                           # seconds since the run began: not a phase


def baselines(keys, prefix: str = "eval/") -> dict[str, tuple[str, str]]:
    """Which evaluation metrics are baselines, learnt from the comparisons the algorithm declared
    (`Algorithm.comparisons`, logged as `<prefix>diff/<a>-<b>`): b is a's baseline; when b is a under
    a prefix (`base/reward` for `reward`), every metric under that prefix is the baseline of its
    namesake without it (`base/correct` of `correct`). Returns name (after `prefix`) -> (the metric
    it is a baseline for, label)."""
    pairs = [pair for key in keys if key.startswith(prefix) for pair in [diff_pair(key[len(prefix):])] if pair]
    out = {b: (a, b) for a, b in pairs}
    prefixes = {b[: -len(a) - 1] for a, b in pairs if b.endswith(f"/{a}")}
    for key in keys:
        name = key[len(prefix):] if key.startswith(prefix) else ""
        for p in prefixes:
            if name.startswith(f"{p}/"):
                out[name] = (name[len(p) + 1:], f"{p} {name[len(p) + 1:]}")
    return out


class ReportError(Exception):
    """Not a run folder, or bad arguments: one line for the user."""


# ---- reading a run folder -----------------------------------------------------------------------
def _flatten(d: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(d, dict):
        out: dict[str, Any] = {}
        for k, v in d.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: d}


def _number(v: Any) -> Optional[float]:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        return None
    return float(v)


@dataclass
class Run:
    path: Path
    records: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)      # flattened: "trainer.steps" -> 6
    summary: Optional[dict[str, Any]] = None
    components: list[str] = field(default_factory=list)
    entities: list[str] = field(default_factory=list)         # agent / role / policy names
    notes: list[str] = field(default_factory=list)
    label: str = ""
    table: dict[str, dict[int, float]] = field(default_factory=dict)

    def series(self, key: str) -> tuple[list[int], list[float]]:
        points = sorted(self.table.get(key, {}).items())
        return [p[0] for p in points], [p[1] for p in points]

    def keys(self) -> list[str]:
        return list(self.table)


def _json_lines(path: Path, notes: list[str], limit: Optional[int] = None) -> Iterator[tuple[int, dict]]:
    """(line number, object) of a JSON-lines file; a line that is not a JSON object becomes a note."""
    with open(path, errors="replace") as f:
        for i, line in enumerate(f, 1):
            if limit is not None and i > limit:
                break
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                notes.append(f"{path.name} line {i} is not valid JSON (cut off by a crash?): skipped")
                continue
            if isinstance(obj, dict):
                yield i, obj
            else:
                notes.append(f"{path.name} line {i} is not a JSON object: skipped")


def _read_metrics(path: Path, notes: list[str]) -> list[dict[str, Any]]:
    out = []
    for i, rec in _json_lines(path, notes):
        if isinstance(rec.get("step"), int):
            out.append(rec)
        else:
            notes.append(f"{path.name} line {i} has no integer step: skipped")
    return out


def _buffer_names(path: Path, notes: list[str]) -> tuple[list[str], list[str]]:
    """Reward component names and agent/role/policy names from the first episodes of the buffer."""
    components: dict[str, None] = {}
    entities: dict[str, None] = {}
    for _, ep in _json_lines(path, notes, limit=20):
        components.update(dict.fromkeys(ep.get("components") or {}))
        for turn in ep.get("turns") or []:
            entities.update(dict.fromkeys(x for x in (turn.get("agent"), turn.get("policy")) if x))
    return list(components), list(entities)


def load_run(path: str | Path) -> Run:
    p = Path(path)
    if not p.exists():
        raise ReportError(f"run_dir={path} does not exist")
    if not p.is_dir():
        raise ReportError(f"run_dir={path} is not a folder")
    if not (p / "config.yaml").is_file() and not (p / "metrics.jsonl").is_file():
        raise ReportError(f"{path} is not a run folder: it has neither config.yaml nor metrics.jsonl "
                          "(give a training run's trainer.output_dir)")
    run = Run(path=p.resolve())
    if (p / "config.yaml").is_file():
        try:
            run.config = _flatten(yaml.safe_load((p / "config.yaml").read_text()) or {})
        except yaml.YAMLError as e:
            run.notes.append(f"config.yaml is not valid YAML ({str(e).splitlines()[0]}): config not shown")
    else:
        run.notes.append("no config.yaml")
    if (p / "metrics.jsonl").is_file():
        run.records = _read_metrics(p / "metrics.jsonl", run.notes)
    else:
        run.notes.append("no metrics.jsonl: the run stopped before its first step was logged")
    if run.records and not any(k.startswith(EVAL_PREFIXES) for r in run.records for k in r):
        run.notes.append("no evaluation logged (trainer.eval_every=0 and trainer.test=false, or the run "
                         "stopped before the first one)")
    if (p / "summary.json").is_file():
        try:
            run.summary = json.loads((p / "summary.json").read_text())
        except json.JSONDecodeError:
            run.notes.append("summary.json is not valid JSON: skipped")
    else:
        run.notes.append("no summary.json: the run did not finish (crashed, stopped or still running); "
                         "the figures show what was logged")
    planned, last = run.config.get("trainer.steps"), max((r["step"] for r in run.records), default=0)
    if isinstance(planned, int) and run.records and last < planned:
        run.notes.append(f"metrics stop at step {last} of {planned}")
    if (p / "buffer.jsonl").is_file():
        run.components, run.entities = _buffer_names(p / "buffer.jsonl", run.notes)
    for rec in run.records:  # a resumed run re-logs steps after its checkpoint: the last record wins
        for k, v in rec.items():
            x = _number(v)
            if k != "step" and x is not None:
                run.table.setdefault(k, {})[rec["step"]] = x
    _derive_learner_tokens(run)
    return run


def _derive_learner_tokens(run: Run) -> None:
    tokens = [k for k in run.table if k == "n_tokens" or k.endswith("/n_tokens")]
    train = run.table.get("time/train", {})
    rates = {s: sum(run.table[k].get(s, 0.0) for k in tokens) / t for s, t in train.items() if t > 0}
    rates = {s: r for s, r in rates.items() if r > 0}
    if rates:
        run.table[LEARNER_TOKENS] = rates


def label_runs(runs: list[Run]) -> None:
    """Each run's label: the config values that differ between the runs (or its folder name)."""
    if len(runs) == 1:
        runs[0].label = runs[0].path.name
        return
    # choices of a whole group (algo.name, model.name, ...) first: they say the most in few words
    differ = sorted(set(config_diff(runs)) - {"trainer.output_dir"}, key=lambda k: (not k.endswith(".name"), k))
    for r in runs:
        parts = [f"{k}={r.config.get(k)}" for k in differ]
        r.label = ", ".join(parts[:3]) + (f", ... (+{len(parts) - 3})" if len(parts) > 3 else "") if parts else r.path.name
    labels = [r.label for r in runs]
    for r in runs:
        if labels.count(r.label) > 1:
            r.label = f"{r.label} ({r.path.name})"


def config_diff(runs: list[Run]) -> list[str]:
    keys = sorted({k for r in runs for k in r.config})
    return [k for k in keys if len({json.dumps(r.config.get(k), sort_keys=True, default=str) for r in runs}) > 1]


# ---- figures ------------------------------------------------------------------------------------
@dataclass
class Group:
    """One panel (or, with several runs, one panel per line): lines and reference lines."""
    title: str
    lines: list[tuple[str, str]]                               # (metric key, label)
    refs: list[tuple[str, str]] = field(default_factory=list)


@dataclass
class Plot:
    name: str
    title: str
    caption: str
    fig: Figure


def _colors(n: int) -> list:
    cmap = colormaps["tab10"]
    return [cmap(i % 10) for i in range(n)]


def _grid(n: int, title: str) -> tuple[Figure, list]:
    n = max(1, min(n, MAX_PANELS))
    cols = 1 if n == 1 else 2
    rows = math.ceil(n / cols)
    fig = Figure(figsize=(WIDTH_IN, ROW_IN * rows), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    axes = [fig.add_subplot(rows, cols, i + 1) for i in range(n)]
    return fig, axes


def _short(text: str, n: int = 60) -> str:
    return text if len(text) <= n else text[: n - 1] + "…"


def _step_axis(ax) -> None:
    ax.set_xlabel("step")
    ax.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))  # one eval point: tick "2", not 1.900..2.100


def smooth(ys: list[float]) -> list[float]:
    """Centred moving mean over about max(3, n/10) points (fewer at the ends): unlike a trailing
    mean or an EMA it does not shift the curve to later steps."""
    h = max(1, len(ys) // 20)
    return [sum(ys[max(0, i - h): i + h + 1]) / len(ys[max(0, i - h): i + h + 1]) for i in range(len(ys))]


def _draw_line(ax, run: Run, key: str, color, label: str, evaluation: bool) -> None:
    xs, ys = run.series(key)
    if not xs:
        return
    if evaluation:
        lo, hi = run.table.get(f"{key}/{CI_LOW}", {}), run.table.get(f"{key}/{CI_HIGH}", {})
        ax.plot(xs, ys, color=color, marker="o", ms=4, lw=1.5, label=label)
        with_ci = [(x, lo[x], hi[x]) for x in xs if x in lo and x in hi]
        if with_ci:
            cx, cl, ch = zip(*with_ci)
            ax.fill_between(cx, cl, ch, color=color, alpha=0.15, lw=0)
            ax.vlines(cx, cl, ch, color=color, lw=1)
    elif len(xs) >= 5:
        ax.plot(xs, ys, color=color, lw=0.8, alpha=0.35)
        ax.plot(xs, smooth(ys), color=color, lw=2, label=label)
    else:
        ax.plot(xs, ys, color=color, lw=1.5, marker="o", ms=4, label=label)


def _draw_ref(ax, run: Run, key: str, color, label: str) -> None:
    xs, ys = run.series(key)
    if not xs:
        return
    if max(ys) - min(ys) < 1e-12:
        ax.axhline(ys[-1], color=color, ls="--", lw=1.3, label=f"{label} ({ys[-1]:.3g})")
    else:
        ax.plot(xs, ys, color=color, ls="--", marker="x", lw=1.3, label=label)


def _panels_figure(runs: list[Run], groups: list[Group], name: str, title: str, caption: str,
                   ylabel: str, evaluation: bool = False) -> Optional[Plot]:
    groups = [g for g in groups if g.lines or g.refs]
    if not groups:
        return None
    multi = len(runs) > 1
    panels = [Group(f"{g.title}: {label}" if len(g.lines) > 1 else g.title, [(k, label)], g.refs)
              for g in groups for k, label in (g.lines or [("", "")])] if multi else groups
    dropped = len(panels) - MAX_PANELS
    panels = panels[:MAX_PANELS]
    fig, axes = _grid(len(panels), title)
    run_colors = _colors(len(runs))
    for ax, g in zip(axes, panels):
        colors = _colors(len(g.lines) + len(g.refs))
        for ri, run in enumerate(runs):
            for li, (key, label) in enumerate(g.lines):
                if key:
                    _draw_line(ax, run, key, run_colors[ri] if multi else colors[li],
                               run.label if multi else label, evaluation)
            for fi, (key, label) in enumerate(g.refs):  # with several runs the colour tells the run
                _draw_ref(ax, run, key, run_colors[ri] if multi else colors[len(g.lines) + fi], label)
        ax.set_title(g.title, fontsize=10)
        _step_axis(ax)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0] and not (multi and not g.refs):
            ax.legend(fontsize=7, loc="best")
    if multi:  # one legend for the run colours
        handles = [Line2D([], [], color=run_colors[i], lw=2) for i in range(len(runs))]
        ncols = min(3 if max(len(r.label) for r in runs) <= 40 else 1, len(runs))
        fig.legend(handles, [r.label for r in runs], loc="outside lower center", ncols=ncols, fontsize=8)
    if dropped > 0:
        caption += f" ({dropped} more panels not shown.)"
    return Plot(name, title, caption, fig)


def _union_keys(runs: list[Run]) -> list[str]:
    return list(dict.fromkeys(k for r in runs for k in r.keys()))


def _components(runs: list[Run]) -> set[str]:
    return {c for r in runs for c in r.components}


def _components_group(runs: list[Run], lines: list[tuple[str, str]], total: str) -> Group:
    """The reward components panel; empty when the only component is the total itself (toy)."""
    if len(lines) == 1 and all(r.table.get(lines[0][0]) == r.table.get(total) for r in runs):
        lines = []
    return Group("reward components", lines)


def reward_plot(runs: list[Run]) -> Optional[Plot]:
    keys, comps = _union_keys(runs), _components(runs)
    reward = [k for k in keys if k.startswith("reward/") and k != "reward/max" and k[7:] not in comps]
    reward.sort(key=lambda k: k != "reward/mean")
    components = [k for k in keys if k.startswith("reward/") and k[7:] in comps]
    groups = [Group("reward", [(k, "mean (all episodes)" if k == "reward/mean" else k[7:]) for k in reward]),
              _components_group(runs, [(k, k[7:]) for k in components], "reward/mean")]
    return _panels_figure(runs, groups, "reward.png", "Training reward per step",
                          "Training reward per step: raw (thin) and smoothed (thick, centred moving mean), the mean "
                          "over the step's episodes and the algorithm's subsets; then the env's reward components.",
                          "reward")


def agents_plot(runs: list[Run]) -> Optional[Plot]:
    entities = list(dict.fromkeys(e for r in runs for e in r.entities))
    families: dict[str, list[tuple[str, str]]] = {}
    for key in _union_keys(runs):
        if key.startswith(("time/",) + EVAL_PREFIXES):
            continue
        parts = key.split("/")
        for i, seg in enumerate(parts):
            if seg in entities:
                template = "/".join(parts[:i] + ["<agent>"] + parts[i + 1:])
                if PER_AGENT_METRIC.search((parts[:i] + parts[i + 1:] or [""])[-1]):
                    families.setdefault(template, []).append((key, seg))
                break
    groups = [Group(t, lines) for t, lines in families.items() if len({e for _, e in lines}) >= 2]
    return _panels_figure(runs, groups, "agents.png", "Per agent / role",
                          "One line per agent, role or policy (names from the episodes in buffer.jsonl): their "
                          "rewards, node values and losses.", "value")


def eval_groups(keys: list[str], components: set[str]) -> list[Group]:
    """Eval panels: a metric's first segment names its panel; the env's reward components share one
    panel (their baselines are left to the summary table: one panel of them would be unreadable)."""
    panels: dict[str, Group] = {}

    def panel(name: str) -> str:
        return "reward components" if name in components else name.split("/")[0]

    refs: list[tuple[str, str, str]] = []
    known = baselines(keys)
    for key in keys:
        if not key.startswith("eval/") or key.rsplit("/", 1)[-1] in SUFFIXES or COST.search(key):
            continue
        name = key[5:]
        base = known.get(name)
        if base is None:
            p = panel(name)
            panels.setdefault(p, Group(p, [])).lines.append((key, name.split("/", 1)[-1] if "/" in name else name))
        elif base[0] not in components:
            refs.append((panel(base[0]), key, base[1]))
    for p, key, label in refs:
        panels.setdefault(p, Group(p, [])).refs.append((key, label))
    return list(panels.values())


def _eval_steps(run: Run) -> set[int]:
    return {s for k, by_step in run.table.items() if k.startswith("eval/") and not COST.search(k) for s in by_step}


def eval_plot(runs: list[Run]) -> Optional[Plot]:
    """The periodic evaluation over steps; None unless a run evaluated more than once (one
    evaluation would be a panel per metric with one dot each: comparison.png shows it)."""
    if not any(len(_eval_steps(r)) > 1 for r in runs):
        return None
    groups = [_components_group(runs, g.lines, "eval/reward") if g.title == "reward components" else g
              for g in eval_groups(_union_keys(runs), _components(runs))]
    return _panels_figure(runs, groups, "eval.png", "Evaluation",
                          "Held-out evaluation per evaluation step (marker), with its interval where the metrics "
                          "carry one (eval/<name>/ci_low, ci_high); dashed: the algorithm's baselines.",
                          "score", evaluation=True)


# ---- the final evaluation: each policy next to its baselines, and the paired differences ----------
RATES = "rates (0-1)"
ROW_H = 0.26          # inches per point in comparison.png / forest.png
PANEL_ROWS = 2.5      # an axis' title and x ticks, in points' rows
BASELINE_GREY = "0.5"


@dataclass
class Evaluation:
    """A run's final evaluation: its `test/` metrics (logged after the last step) when there are
    any, else the `eval/` metrics of the last step that has them."""
    prefix: str                  # "test" or "eval"
    step: int
    metrics: dict[str, float]    # name after the prefix -> value, the interval keys included

    def describe(self) -> str:
        return f"test split, after step {self.step}" if self.prefix == "test" else f"evaluation at step {self.step}"


def final_evaluation(run: Run) -> Optional[Evaluation]:
    for prefix in ("test", "eval"):
        keys = [k for k in run.table if k.startswith(f"{prefix}/")]
        if keys:
            step = max(s for k in keys for s in run.table[k])
            metrics = {k[len(prefix) + 1:]: run.table[k][step] for k in keys if step in run.table[k]}
            return Evaluation(prefix, step, metrics)
    return None


@dataclass
class Row:
    """One point of comparison.png / forest.png."""
    label: str
    iv: Interval          # nan bounds: no interval logged, drawn as the point alone
    filled: bool          # comparison: a policy (its baselines hollow); forest: the interval excludes 0


@dataclass
class Panel:
    """One axis of comparison.png / forest.png: groups of rows, top to bottom, a gap between groups."""
    title: str
    groups: list[list[Row]]
    unit: bool = False    # rates: the axis spans 0..1
    zero: bool = False    # differences: a line at 0


def _interval(metrics: dict[str, float], name: str, signed: bool = False) -> Interval:
    low, high, n = (metrics.get(f"{name}/{s}") for s in SUFFIXES)
    if low is None or high is None:
        low = high = math.nan
    return Interval(metrics[name], low, high, None if n is None else int(n), signed)


def _row_label(name: str, iv: Interval) -> str:
    """`acc/final (n=200)  0.31 [0.25, 0.38]`"""
    n = f" (n={iv.n})" if iv.n is not None else ""
    return f"{name}{n}  {Interval(iv.estimate, iv.low, iv.high, None, iv.signed).format()}"


def policy_clusters(metrics: dict[str, float]) -> list[list[str]]:
    """An evaluation's scores (not its differences, intervals or costs) in clusters: a policy's
    metric, then its baselines (`baselines`); one that has baselines of its own comes after the
    others, followed by its own (MALT: mv/gvr, baseline/mv/gvr, mv/g, baseline/mv/g). A metric
    compared with nothing is a cluster of one."""
    names = [k for k in metrics if k.rsplit("/", 1)[-1] not in SUFFIXES and not k.startswith(f"{DIFF}/")
             and not COST.search(k)]
    known, present, parent = baselines(metrics, prefix=""), set(names), {}
    for name in names:
        of = known.get(name, ("",))[0]
        if of in present and not _leads_to(parent, of, name):  # a - b and b - a both declared: no cycle
            parent[name] = of

    def tree(name: str) -> list[str]:
        children = sorted((c for c in names if parent.get(c) == name), key=lambda c: c in parent.values())
        return [name] + [x for child in children for x in tree(child)]
    return [tree(name) for name in names if name not in parent]


def _leads_to(parent: dict[str, str], start: str, target: str) -> bool:
    while start != target and start in parent:
        start = parent[start]
    return start == target


def _scale(cluster: list[str], metrics: dict[str, float]) -> str:
    """The axis of a policy and its baselines: rates (every estimate in 0..1, not a reward) share
    one; any other family (the policy metric's first segment: reward, ...) has its own."""
    root = cluster[0]
    if "reward" not in root.split("/") and all(0 <= metrics[n] <= 1 for n in cluster):
        return RATES
    return root.split("/")[0]


def _rates_first(scales: dict[str, Any]) -> list[tuple[str, Any]]:
    return sorted(scales.items(), key=lambda kv: kv[0] != RATES)  # stable: the others as they came


def comparison_panels(metrics: dict[str, float]) -> list[Panel]:
    """comparison.png's axes for one evaluation: per scale, each policy (filled) followed by its
    baselines (hollow), with their intervals."""
    scales: dict[str, list[list[Row]]] = {}
    for cluster in policy_clusters(metrics):
        ivs = [_interval(metrics, n) for n in cluster]
        rows = [Row(_row_label(n, iv), iv, filled=i == 0) for i, (n, iv) in enumerate(zip(cluster, ivs))]
        scales.setdefault(_scale(cluster, metrics), []).append(rows)
    return [Panel(scale, groups, unit=scale == RATES) for scale, groups in _rates_first(scales)]


def forest_panels(metrics: dict[str, float]) -> list[Panel]:
    """forest.png's axes for one evaluation: every paired difference `diff/<a>-<b>` as a row
    `a - b (n=..)`, filled when its interval excludes 0; one axis per scale of a (as comparison.png)."""
    scale_of = {n: _scale(c, metrics) for c in policy_clusters(metrics) for n in c}
    scales: dict[str, list[Row]] = {}
    for name in metrics:
        pair = diff_pair(name)
        if pair:
            iv = _interval(metrics, name, signed=True)
            scales.setdefault(scale_of.get(pair[0], "other"), []).append(
                Row(_row_label(f"{pair[0]} - {pair[1]}", iv), iv, filled=iv.low > 0 or iv.high < 0))  # nan: False
    return [Panel(f"differences, {scale}", [rows], zero=True) for scale, rows in _rates_first(scales)]


def _final_panels(runs: list[Run], make) -> list[Panel]:
    """`make`'s panels of each run's final evaluation, titled with what was evaluated (and the run)."""
    out = []
    for run in runs:
        ev = final_evaluation(run)
        who = f"{run.label}: " if len(runs) > 1 else ""
        out += [replace(p, title=f"{who}{p.title} ({ev.describe()})") for p in (make(ev.metrics) if ev else [])]
    return out


def _draw_rows(ax, panel: Panel, color) -> None:
    y, ticks, labels = 0.0, [], []
    for group in panel.groups:
        for row in group:
            c = color if row.filled or panel.zero else BASELINE_GREY
            if math.isfinite(row.iv.low) and math.isfinite(row.iv.high):
                ax.hlines(y, row.iv.low, row.iv.high, color=c, lw=3)
            ax.plot([row.iv.estimate], [y], "o", ms=9, mec=c, mew=2, mfc=c if row.filled else "white", zorder=3)
            ticks.append(y)
            labels.append(row.label)
            y += 1
        y += 0.5
    ax.set_yticks(ticks, labels, fontsize=8)
    ax.set_ylim(ticks[-1] + 0.7, -0.7)  # the first row on top
    if panel.zero:
        ax.axvline(0, color="0.3", ls="--", lw=1)
    if panel.unit:  # a t interval of a mean of 0..1 outcomes may stick out a little
        vals = [v for g in panel.groups for r in g for v in (r.iv.low, r.iv.high) if math.isfinite(v)]
        ax.set_xlim(min(vals + [0.0]) - 0.02, max(vals + [1.0]) + 0.02)
    ax.set_title(panel.title, fontsize=9, loc="left")
    ax.grid(alpha=0.3, axis="x")


def _rows_figure(panels: list[Panel], name: str, title: str, caption: str) -> Optional[Plot]:
    """One axis per panel, stacked, each as tall as its rows; the height a whole number of ROW_IN."""
    if not panels:
        return None
    dropped = len(panels) - MAX_PANELS
    panels = panels[:MAX_PANELS]
    heights = [sum(map(len, p.groups)) + 0.5 * (len(p.groups) - 1) + PANEL_ROWS for p in panels]
    fig = Figure(figsize=(WIDTH_IN, ROW_IN * math.ceil((sum(heights) + 1) * ROW_H / ROW_IN)), dpi=DPI,
                 layout="constrained")
    FigureCanvasAgg(fig)
    fig.suptitle(title, fontsize=12)
    grid = fig.add_gridspec(len(panels), 1, height_ratios=heights)
    for i, panel in enumerate(panels):
        _draw_rows(fig.add_subplot(grid[i]), panel, _colors(1)[0])
    if dropped > 0:
        caption += f" ({dropped} more panels not shown.)"
    return Plot(name, title, caption, fig)


def comparison_plot(runs: list[Run]) -> Optional[Plot]:
    return _rows_figure(_final_panels(runs, comparison_panels), "comparison.png", "Final evaluation",
                        "Final evaluation (test/ when logged, else the last eval/): each policy (filled) with its "
                        "95% interval, its baselines (hollow, grey) right below it.")


def forest_plot(runs: list[Run]) -> Optional[Plot]:
    return _rows_figure(_final_panels(runs, forest_panels), "forest.png", "Paired differences",
                        "Paired differences a - b on the same tasks (diff/<a>-<b>) with their 95% intervals; "
                        "filled: the interval excludes 0.")


def throughput_plot(runs: list[Run]) -> Optional[Plot]:
    keys = _union_keys(runs)
    lines = [(k, k) for k in keys if k == LEARNER_TOKENS or (k.endswith("tokens_per_s") and not k.startswith(EVAL_PREFIXES))]
    ev = [(k, k[5:]) for k in keys if k.startswith("eval/") and k.endswith("tokens_per_s")]
    known = baselines(keys)
    ev_lines = [(k, lab) for k, lab in ev if lab not in known]
    ev_refs = [(k, known[lab][1]) for k, lab in ev if lab in known]
    return _panels_figure(runs, [Group("training", lines), Group("evaluation", ev_lines, ev_refs)],
                          "throughput.png", "Tokens per second",
                          f"'{LEARNER_TOKENS}': tokens trained in the step (n_tokens, summed over policies) / "
                          "time/train; other lines: the tokens_per_s the algorithm logs.", "tokens/s")


def _phases(run: Run) -> tuple[list[str], dict[str, float]]:
    """Per-step phases (in stacking order) and one-off phase totals."""
    one_steps = {s for p in ONE_OFF_PHASES for s in run.table.get(f"time/{p}", {})}
    per_step, one_off = [], {}
    for k in run.keys():
        if not k.startswith("time/") or k in ("time/step", WALL):
            continue
        steps = set(run.table[k])
        if k[5:] in ONE_OFF_PHASES or steps <= one_steps:
            one_off[k[5:]] = sum(run.table[k].values())
        else:
            per_step.append(k[5:])
    per_step.sort(key=lambda p: -sum(run.table[f"time/{p}"].values()))
    return per_step, one_off


def time_plot(runs: list[Run]) -> Optional[Plot]:
    runs_t = [r for r in runs if any(k.startswith("time/") for k in r.keys())]
    if not runs_t:
        return None
    all_phases = list(dict.fromkeys(p for r in runs_t for p in _phases(r)[0])) + ["other"]
    colors = dict(zip(all_phases, _colors(len(all_phases))))
    fig, axes = _grid(len(runs_t), "Time per step by phase")
    notes = []
    for ax, run in zip(axes, runs_t):
        phases, one_off = _phases(run)
        steps = sorted({s for p in phases for s in run.table[f"time/{p}"]} | set(run.table.get("time/step", {})))
        bottom = [0.0] * len(steps)
        for p in phases + ["other"]:
            if p == "other":
                total = run.table.get("time/step", {})
                vals = [max(0.0, total.get(s, b) - b) for s, b in zip(steps, bottom)]
            else:
                vals = [run.table[f"time/{p}"].get(s, 0.0) for s in steps]
            if any(vals):
                top = [b + v for b, v in zip(bottom, vals)]
                if len(steps) <= MAX_BARS:
                    ax.bar(steps, vals, bottom=bottom, color=colors[p], label=p, width=0.8)
                else:  # thousands of bars are slow to draw and unreadable: stacked areas
                    ax.fill_between(steps, bottom, top, color=colors[p], label=p, lw=0, step="mid")
                bottom = top
        ax.set_title(_short(run.label) if len(runs) > 1 else "seconds per step", fontsize=9)
        _step_axis(ax)
        ax.set_ylabel("seconds")
        ax.grid(alpha=0.3, axis="y")
        ax.legend(fontsize=7, loc="best")
        if one_off:
            notes.append((f"{run.label}: " if len(runs) > 1 else "")
                         + ", ".join(f"{p} {s:.1f} s" for p, s in one_off.items()))
    caption = ("Wall-clock seconds of each step, stacked by phase (time/<phase>); 'other' is the rest of "
               "time/step (untimed work: rollout bookkeeping, logging).")
    if notes:
        caption += " Once per run, before the first step: " + "; ".join(notes) + "."
    return Plot("time.png", "Time per step by phase", caption, fig)


# timeline lanes: the rollout side (collect: generate + reward), the learners, the weight push,
# and what stops both (evaluation, checkpoints)
LANES = (("rollout", ("collect",)), ("learner", ("train",)), ("push", ("sync",)),
         ("eval / save", ("eval", "test", "save")))


def timeline_plot(runs: list[Run]) -> Optional[Plot]:
    """Per run, what each side did when: one bar per step and phase from `span/<phase>/start|end`
    (seconds since the run began). Bars of one step's rollout under the previous step's training
    are the overlap of trainer.max_staleness >= 1; gaps in a lane are that side idle."""
    runs_t = [r for r in runs if "span/train/start" in r.table]
    if not runs_t:
        return None
    fig, axes = _grid(len(runs_t), "Timeline")
    colors = dict(zip([lane for lane, _ in LANES], _colors(len(LANES))))
    for ax, run in zip(axes, runs_t):
        for row, (lane, phases) in enumerate(LANES):
            bars = [(a, run.table[f"span/{p}/end"][s] - a) for p in phases
                    for s, a in run.table.get(f"span/{p}/start", {}).items() if s in run.table.get(f"span/{p}/end", {})]
            if bars:
                ax.broken_barh(bars, (row - 0.35, 0.7), color=colors[lane], edgecolor="white", lw=0.3)
        ax.set_yticks(range(len(LANES)), [lane for lane, _ in LANES], fontsize=8)
        ax.invert_yaxis()
        ax.set_xlabel("seconds since the run began")
        ax.set_title(_short(run.label) if len(runs) > 1 else "what each side did when", fontsize=9)
        ax.grid(alpha=0.3, axis="x")
    caption = ("One bar per step and phase (span/<phase>/start|end): the rollout (generate + reward), the learners' "
               "train step, the weight push, evaluation and checkpoints. With trainer.max_staleness >= 1 a "
               "step's rollout runs under the previous step's training; a gap in a lane is that side idle.")
    return Plot("timeline.png", "Timeline", caption, fig)


PLOTS = (comparison_plot, forest_plot, reward_plot, agents_plot, eval_plot, time_plot, timeline_plot, throughput_plot)


# ---- the folder ---------------------------------------------------------------------------------
def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    if isinstance(v, (dict, list)):
        return json.dumps(v)
    return str(v)


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(_fmt(c))}</td>" for c in row) + "</tr>" for row in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _summary(run: Run) -> dict[str, Any]:
    """summary.json flattened; for an unfinished run, the first and last training rewards and the
    last evaluation from metrics.jsonl."""
    if run.summary is not None:
        out = {k: v for k, v in _flatten(run.summary).items() if k != "output_dir"}
    else:
        out = {}
        if run.records:
            out["steps logged"] = max(r["step"] for r in run.records)
        for key in run.keys():
            xs, ys = run.series(key)
            if key.startswith("reward/"):
                out[f"train.{key}.first"], out[f"train.{key}.last"] = ys[0], ys[-1]
            elif key.startswith(EVAL_PREFIXES) and not COST.search(key):
                out[key.replace("/", ".", 1)] = ys[-1]  # as summary.json flattens: eval.<name>, test.<name>
    # an interval (marl_llm.stats keys) is shown in one cell: 0.312 [0.142, 0.556], n=16
    for key in list(out):
        iv = interval_from_metrics(out, key)
        if iv is not None:
            out[key] = iv.format(3)
            for suffix in SUFFIXES:
                out.pop(f"{key}/{suffix}", None)
    return out


CSS = """body{font-family:sans-serif;max-width:1040px;margin:1em auto;color:#222}
figure{margin:1.5em 0}figcaption{font-size:.9em;color:#444}img{border:1px solid #ddd}
table{border-collapse:collapse;font-size:.85em;margin:.5em 0}td,th{border:1px solid #ccc;padding:2px 6px;text-align:left}
.note{background:#fff4d6;border-left:4px solid #e0a800;padding:.4em .8em;margin:.3em 0}code{background:#f3f3f3}"""


def _html(runs: list[Run], plots: list[Plot], command: str) -> str:
    parts = [f"<!doctype html><html><head><meta charset='utf-8'><title>marl_llm report</title>"
             f"<style>{CSS}</style></head><body><h1>marl_llm report</h1>"]
    parts.append(_table(["run", "folder", "algo", "env", "model", "steps logged / planned"],
                        [[r.label, str(r.path), r.config.get("algo.name", "?"), r.config.get("env.name", "?"),
                          r.config.get("model.name", "?"),
                          f"{max((x['step'] for x in r.records), default=0)} / {r.config.get('trainer.steps', '?')}"]
                         for r in runs]))
    for r in runs:
        for note in r.notes:
            parts.append(f"<div class='note'>{html.escape((r.label + ': ') if len(runs) > 1 else '')}"
                         f"{html.escape(note)}</div>")
    if not plots:
        parts.append("<div class='note'>no metrics to plot</div>")
    for p in plots:
        w, h = p.fig.canvas.get_width_height()
        parts.append(f"<figure><img src='{p.name}' width='{w}' height='{h}' alt='{html.escape(p.title)}'>"
                     f"<figcaption>{html.escape(p.caption)}</figcaption></figure>")
    parts.append("<h2>Summary</h2>")
    summaries = [_summary(r) for r in runs]
    keys = list(dict.fromkeys(k for s in summaries for k in s))
    parts.append(_table(["key"] + [r.label for r in runs], [[k] + [s.get(k, "") for s in summaries] for k in keys]))
    parts.append("<h2>Config</h2>")
    if len(runs) > 1:
        diff = config_diff(runs)
        parts.append("<p>Keys that differ between the runs:</p>")
        parts.append(_table(["key"] + [r.label for r in runs], [[k] + [r.config.get(k, "") for r in runs] for k in diff]))
    cfg_keys = list(dict.fromkeys(k for r in runs for k in r.config))
    parts.append(f"<details{' open' if len(runs) == 1 else ''}><summary>full config</summary>"
                 + _table(["key"] + [r.label for r in runs], [[k] + [r.config.get(k, "") for r in runs] for k in cfg_keys])
                 + "</details>")
    parts.append(f"<p><small>{html.escape(command)} &middot; {datetime.now():%Y-%m-%d %H:%M}</small></p></body></html>")
    return "\n".join(parts)


def write_report(run_dirs: list[str | Path], out: Optional[str | Path] = None) -> Path:
    """Write the report folder for `run_dirs` (overlaid when several); returns its index.html."""
    if not run_dirs:
        raise ReportError("give at least one run_dir=PATH")
    runs = [load_run(d) for d in run_dirs]
    label_runs(runs)
    out_dir = Path(out) if out is not None else runs[0].path / "report"
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ReportError(f"cannot create the report folder out={out_dir}: {e.strerror}") from None
    plots = [p for p in (make(runs) for make in PLOTS) if p is not None]
    for p in plots:
        p.fig.savefig(out_dir / p.name, dpi=DPI)
    command = "python -m marl_llm.report " + " ".join(f"run_dir={r.path}" for r in runs) + (f" out={out}" if out else "")
    index = out_dir / "index.html"
    index.write_text(_html(runs, plots, command))
    return index


USAGE = "usage: python -m marl_llm.report run_dir=RUN [run_dir=RUN2 ...] [out=DIR]"


def parse_args(argv: list[str]) -> tuple[list[str], Optional[str]]:
    runs, out = [], None
    for arg in argv:
        key, sep, value = arg.partition("=")
        if not sep or not value or key not in ("run_dir", "out"):
            raise ReportError(f"bad argument {arg!r}; {USAGE}")
        if key == "run_dir":
            runs.append(value)
        else:
            out = value
    if not runs:
        raise ReportError(f"no run_dir given; {USAGE}")
    return runs, out


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] in ("-h", "--help"):
        print(USAGE + "\n\n" + (__doc__ or "").split("\n\n", 1)[1])
        return 0
    try:
        index = write_report(*parse_args(argv))
    except ReportError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    print(f"report: {index}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
