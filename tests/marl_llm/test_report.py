"""python -m marl_llm.report and the metrics loggers (metrics.jsonl, TensorBoard, wandb offline).

Fast tests build synthetic run folders with the metric names the algorithms log; one real tiny-model
GRPO run (Ray + vLLM + DeepSpeed, ~2 min on 2 cores) checks the trainer's own report and that the
wandb logger, in offline mode, holds the same scalars as metrics.jsonl and TensorBoard.
"""
import glob
import json
import math
import os
import re
import struct
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml
from PIL import Image

from algorithms.base import outcome_metrics
from marl_llm import report
from marl_llm.metrics import MetricsLogger
from marl_llm.stats import interval_metrics, paired_difference, wilson_interval

TAB10 = [(31, 119, 180), (255, 127, 14)]  # the first two run colours


# ---- helpers ------------------------------------------------------------------------------------
def make_run(path: Path, records, config=None, summary=True, components=(), agents=("single",)):
    path.mkdir(parents=True, exist_ok=True)
    cfg = {"algo": {"name": "grpo"}, "env": {"name": "toy"}, "model": {"name": "tiny"},
           "learner": {"lr": 1e-5}, "trainer": {"steps": len(records), "output_dir": str(path)}}
    for k, v in (config or {}).items():
        section, key = k.split(".")
        cfg[section][key] = v
    (path / "config.yaml").write_text(yaml.safe_dump(cfg))
    (path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    ep = {"components": {c: 0.5 for c in components}, "turns": [{"agent": a, "policy": a} for a in agents]}
    (path / "buffer.jsonl").write_text(json.dumps(ep) + "\n")
    if summary:
        (path / "summary.json").write_text(json.dumps({"steps": len(records), "eval": {"reward": 0.5}}))
    return path


def grpo_records(n=12, offset=0.0, evals=True):
    recs = []
    for s in range(1, n + 1):
        r = {"step": s, "reward/mean": 0.3 + 0.02 * s + offset + 0.03 * math.sin(s), "reward/max": 0.9,
             "reward/share": 0.3 + 0.02 * s + offset, "reward/length": 0.1 * (s % 3), "loss": 0.1, "n_tokens": 2048 + round(5000 * offset),
             "time/generate": 4.0 + s % 2, "time/train": 5.0, "time/sync": 0.3, "time/step": 10.0}
        if s == 1:
            r.update({"time/setup": 40.0, "time/prepare": 0.5})
        if evals and s % 4 == 0:
            r.update(interval_metrics("eval/reward", wilson_interval(5 + s // 4 + round(10 * offset), 16)))
            r["eval/share"] = 0.4 + offset
        recs.append(r)
    return recs


def check_report(index: Path) -> dict[str, np.ndarray]:
    """index.html exists and references PNGs that decode, have the size it declares (1000 px wide,
    320 px per row of panels) and show drawn data (coloured pixels, not only black/grey text)."""
    assert index.name == "index.html" and index.is_file()
    text = index.read_text()
    assert "<script" not in text
    imgs = re.findall(r"<img src='([^']+)' width='(\d+)' height='(\d+)'", text)
    assert imgs, text[:2000]
    out = {}
    for name, w, h in imgs:
        im = Image.open(index.parent / name)
        im.load()
        assert im.format == "PNG" and im.size == (int(w), int(h)) == (1000, int(h))
        assert int(h) % 320 == 0
        px = np.asarray(im.convert("RGB")).astype(int)
        assert px.var() > 0, name
        coloured = (px.max(axis=2) - px.min(axis=2)) > 60
        # a forest plot of one difference may be a single marker (a tiny run: +0.00 [+0.00, +0.00])
        assert coloured.sum() > (50 if name == "forest.png" else 300), f"{name} shows no data"
        out[name] = px
    return out


def has_colour(px: np.ndarray, rgb, tol=12, min_pixels=50) -> bool:
    return int((np.abs(px - np.array(rgb)).max(axis=2) <= tol).sum()) >= min_pixels


# ---- synthetic folders (fast) -------------------------------------------------------------------
def test_single_run_report(tmp_path):
    run = make_run(tmp_path / "run", grpo_records(), components=("share", "length"))
    assert report.main([f"run_dir={run}"]) == 0
    pngs = check_report(run / "report" / "index.html")
    # no paired difference logged: no forest.png
    assert set(pngs) == {"comparison.png", "reward.png", "eval.png", "time.png", "throughput.png"}
    html = (run / "report" / "index.html").read_text()
    assert "setup 40.0 s" in html and "prepare 0.5 s" in html  # one-off phases in the caption, not the stack
    assert "learner.lr" in html and "class='note'" not in html  # a complete run: nothing to note


def test_smoothing_keeps_trends_in_place():
    assert report.smooth([2.0] * 7) == [2.0] * 7
    line = [float(x) for x in range(40)]
    assert report.smooth(line)[2:-2] == line[2:-2]  # a centred mean does not lag a trend


def test_long_run_time_figure_uses_areas(tmp_path):
    run = report.load_run(make_run(tmp_path / "long", grpo_records(report.MAX_BARS + 50, evals=False)))
    report.label_runs([run])
    ax = report.time_plot([run]).fig.axes[0]
    assert not ax.patches and len(ax.collections) == 4  # generate, train, sync, other: one area each


def test_reward_and_eval_panels_follow_the_metric_names():
    runs = [report.Run(path=Path("r"), table={"reward/mean": {1: 0.1}, "reward/with_team": {1: 0.2},
                                               "reward/solo": {1: 0.0}, "reward/max": {1: 1.0},
                                               "reward/share": {1: 0.15}}, components=["share"], label="r")]
    plot = report.reward_plot(runs)
    titles = [ax.get_title() for ax in plot.fig.axes]
    assert titles == ["reward", "reward components"]
    labels = plot.fig.axes[0].get_legend_handles_labels()[1]
    assert labels == ["mean (all episodes)", "with_team", "solo"]  # not max, not the component

    def groups(keys, comps=()):
        return {g.title: (g.lines, g.refs) for g in report.eval_groups([f"eval/{k}" for k in keys], set(comps))}

    # baselines are learnt from the comparisons the algorithm declared (eval/diff/<a>-<b>), not names:
    # MLPO: majority vote, single agent and the untrained leader are reference lines in the acc panel
    mlpo = groups(["acc/round0", "acc/final", "acc/majority", "acc/leader_alone", "acc/single",
                   "acc/untrained_final", "gens/majority", "tokens/round0", "reward",
                   "diff/acc/final-acc/untrained_final", "diff/acc/final-acc/majority",
                   "diff/acc/leader_alone-acc/single", "diff/acc/final-acc/majority/ci_low"])
    assert [lab for _, lab in mlpo["acc"][0]] == ["round0", "final", "leader_alone"]
    assert [lab for _, lab in mlpo["acc"][1]] == ["acc/majority", "acc/single", "acc/untrained_final"]
    assert set(mlpo) == {"acc", "reward", "diff"}  # costs (gens, tokens) are not plotted
    # MAGRPO: <baseline>/<metric> next to the trained metric; components share one panel
    magrpo = groups(["reward", "solved", "structure", "naive/reward", "single/reward", "naive/structure",
                     "naive/latency_s", "tokens_per_s", "diff/reward-naive/reward", "diff/reward-single/reward"],
                    comps=["structure"])
    assert magrpo["reward"] == ([("eval/reward", "reward")], [("eval/naive/reward", "naive reward"),
                                                              ("eval/single/reward", "single reward")])
    assert magrpo["reward components"] == ([("eval/structure", "structure")], [])
    assert set(magrpo) == {"reward", "solved", "reward components", "diff"}
    # MALT: the untrained chain's votes next to the trained ones
    malt = groups(["mv/gvr", "mv/g", "baseline/mv/gvr", "baseline/mv/g", "mv/gvr/ci_low", "mv/gvr/ci_high",
                   "diff/mv/gvr-baseline/mv/gvr"])
    assert malt["mv"] == ([("eval/mv/gvr", "gvr"), ("eval/mv/g", "g")],
                          [("eval/baseline/mv/gvr", "baseline mv/gvr"), ("eval/baseline/mv/g", "baseline mv/g")])
    # without declared comparisons nothing is a baseline: every metric is a line of its own
    assert groups(["acc/final", "acc/majority"]) == {"acc": ([("eval/acc/final", "final"),
                                                              ("eval/acc/majority", "majority")], [])}


def test_agents_figure_one_line_per_agent_or_role(tmp_path):
    recs = [{"step": s, "reward/mean": 0.5, "reward/turn1": 0.4, "reward/turn2": 0.6,
             "agent1/loss": 1.0 / s, "agent2/loss": 2.0 / s, "agent1/lr": 1e-5, "agent2/lr": 1e-5,
             "tree/value/generator": 0.2 * s, "tree/value/verifier": 0.3, "time/train": 1.0, "time/step": 2.0}
            for s in range(1, 4)]
    run = make_run(tmp_path / "m", recs, agents=("agent1", "agent2", "generator", "verifier"))
    index = report.write_report([run])
    assert "agents.png" in check_report(index)
    plot = report.agents_plot([report.load_run(run)])
    assert {ax.get_title() for ax in plot.fig.axes} == {"<agent>/loss", "tree/value/<agent>"}  # not lr
    loss_ax = next(ax for ax in plot.fig.axes if ax.get_title() == "<agent>/loss")
    assert loss_ax.get_legend_handles_labels()[1] == ["agent1", "agent2"]


def test_eval_interval_is_drawn(tmp_path):
    run = report.load_run(make_run(tmp_path / "r", grpo_records()))
    report.label_runs([run])
    ax = next(a for a in report.eval_plot([run]).fig.axes if a.get_title() == "reward")
    assert ax.collections, "no interval drawn"
    lo, hi = run.series("eval/reward/ci_low")[1], run.series("eval/reward/ci_high")[1]
    segs = [s for c in ax.collections for s in getattr(c, "get_segments", lambda: [])()]
    assert sorted((round(float(s[0][1]), 6), round(float(s[1][1]), 6)) for s in segs) == \
        sorted((round(a, 6), round(b, 6)) for a, b in zip(lo, hi))


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
def test_multi_run_overlay(tmp_path):
    a = make_run(tmp_path / "a", grpo_records(), config={"learner.lr": 1e-5})
    b = make_run(tmp_path / "b", grpo_records(offset=0.2), config={"learner.lr": 1e-4})
    out = tmp_path / "cmp"
    r = subprocess.run([sys.executable, "-m", "marl_llm.report", f"run_dir={a}", f"run_dir={b}", f"out={out}"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == f"report: {out / 'index.html'}"
    pngs = check_report(out / "index.html")
    for name in ("reward.png", "eval.png", "throughput.png"):
        assert has_colour(pngs[name], TAB10[0]) and has_colour(pngs[name], TAB10[1]), name
    html = (out / "index.html").read_text()
    assert "learner.lr=1e-05" in html and "learner.lr=0.0001" in html  # legend labels: the config difference
    assert "Keys that differ" in html
    runs = [report.load_run(a), report.load_run(b)]
    report.label_runs(runs)
    assert [x.label for x in runs] == ["learner.lr=1e-05", "learner.lr=0.0001"]
    assert len(report.time_plot(runs).fig.axes) == 2  # stacked bars cannot overlay: one panel per run
    assert not (a / "report").exists()


def test_crashed_run_reports_what_exists(tmp_path):
    run = make_run(tmp_path / "crash", grpo_records(5), summary=False)
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    cfg["trainer"]["steps"] = 10
    (run / "config.yaml").write_text(yaml.safe_dump(cfg))
    with open(run / "metrics.jsonl", "a") as f:
        f.write('{"step": 6, "reward/me')  # cut off mid-line
    (run / "buffer.jsonl").unlink()
    index = report.write_report([run])
    check_report(index)
    html = index.read_text()
    assert "metrics.jsonl line 6 is not valid JSON" in html
    assert "no summary.json" in html and "metrics stop at step 5 of 10" in html
    assert "train.reward/mean.last" in html  # the summary table falls back to metrics.jsonl
    # the last evaluation (step 4) with its interval in one cell, as marl_llm.stats formats it
    assert f"<td>eval.reward</td><td>{wilson_interval(6, 16).format(3)}</td>" in html
    assert "eval.reward/ci_low" not in html


def test_run_that_stopped_before_its_first_step(tmp_path):
    run = tmp_path / "early"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": "mlpo"}, "trainer": {"steps": 6}}))
    index = report.write_report([run])
    html = index.read_text()
    assert "no metrics.jsonl" in html and "no metrics to plot" in html
    assert not list(index.parent.glob("*.png"))


@pytest.mark.engine  # the command line in a subprocess (setup.cfg)
@pytest.mark.parametrize("args,message", [
    (["run_dir={tmp}"], "is not a run folder"),
    (["run_dir={tmp}/missing"], "does not exist"),
    ([], "no run_dir given"),
    (["run_dir={tmp}", "colour=red"], "bad argument 'colour=red'"),
    (["run_dir={run}", "out={tmp}/notes.txt/report"], "cannot create the report folder"),
])
def test_not_a_run_or_bad_argument_is_one_line_error(tmp_path, args, message):
    (tmp_path / "notes.txt").write_text("not a run")
    run = make_run(tmp_path / "run", grpo_records(3))
    r = subprocess.run([sys.executable, "-m", "marl_llm.report"] + [a.format(tmp=tmp_path, run=run) for a in args],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 2
    assert r.stderr.startswith("error: ") and r.stderr.count("\n") == 1 and message in r.stderr, r.stderr
    assert "Traceback" not in r.stderr


def test_unknown_logger_is_a_config_error():
    from marl_llm.config import ConfigError, TrainerConfig
    with pytest.raises(ConfigError, match=r"trainer.loggers=.* unknown entries \['mlflow'\]; choose from \['tensorboard', 'wandb'\]"):
        TrainerConfig(loggers=["tensorboard", "mlflow"])


# ---- the final evaluation: comparison.png and forest.png ------------------------------------------
AFTER = [1, 1, 0, 1, 1, 0, 1, 1, 1, 0]
BEFORE = [0, 1, 0, 0, 1, 0, 0, 1, 0, 0]
VOTE = [1, 1, 0, 1, 0, 0, 1, 1, 1, 1]
MLPO_DIFFS = [("acc/final", "acc/untrained_final"), ("acc/final", "acc/majority"),
              ("lenient/acc/final", "lenient/acc/untrained_final")]


def mlpo_eval(after=AFTER):
    """An MLPO-like evaluation block as `Algorithm.eval_metrics` returns it: scores with their
    intervals, the declared paired differences, a cost and a reward on its own scale."""
    return {**outcome_metrics({"acc/final": after, "acc/untrained_final": BEFORE, "acc/majority": VOTE,
                               "lenient/acc/final": after, "lenient/acc/untrained_final": BEFORE,
                               "reward": [2.0 * x + 0.5 for x in after]}, MLPO_DIFFS),
            "tokens/final": 31.0}


def trainer_records(steps, eval_steps=(), test=True):
    """metrics.jsonl as the trainer writes it: one record per step with `eval/<name>` at the
    evaluation steps (a better policy at each), then the final `test/<name>` evaluation."""
    recs = [{"step": s, "reward/mean": 0.1 * s, "loss": 0.2, "time/train": 1.0, "time/step": 2.0}
            for s in range(1, steps + 1)]
    for s in eval_steps:
        recs[s - 1].update({f"eval/{k}": v for k, v in mlpo_eval(BEFORE[:s] + AFTER[s:]).items()})
    if test:
        recs.append({"step": steps, **{f"test/{k}": v for k, v in mlpo_eval().items()}})
    return recs


def final_run(tmp_path, name, records):
    """A finished run folder whose summary.json holds the final evaluation as the trainer's does."""
    run = make_run(tmp_path / name, records, config={"trainer.steps": records[-1]["step"]}, summary=False)
    last = {k: v for r in records for k, v in r.items() if r["step"] == records[-1]["step"]}
    summary = {"steps": records[-1]["step"], **{p: {k[len(p) + 1:]: v for k, v in last.items() if k.startswith(f"{p}/")}
                                                for p in ("eval", "test")}}
    (run / "summary.json").write_text(json.dumps(summary))
    return run


def name_of(row):
    return re.split(r" \(n=|  ", row.label)[0]


def rows(panel):
    return [(name_of(r), r.iv.estimate, r.iv.low, r.iv.high, r.iv.n, r.filled)
            for g in panel.groups for r in g]


def test_one_test_evaluation_is_compared_not_drawn_as_dots_per_panel(tmp_path):
    run = final_run(tmp_path, "test_only", trainer_records(3))  # trainer.eval_every=0: only the test split
    index = report.write_report([run])
    pngs = check_report(index)
    assert {"comparison.png", "forest.png"} <= set(pngs) and "eval.png" not in pngs
    html = index.read_text()
    figures = re.findall(r"<img src='([^']+)'.*?<figcaption>([^<]+)</figcaption>", html)
    assert [f for f, _ in figures[:2]] == ["comparison.png", "forest.png"]
    assert all(caption and "\n" not in caption for _, caption in figures[:2])
    assert "class='note'" not in html  # a test evaluation is an evaluation
    # the summary table still prints each interval in one cell
    assert f"<td>test.acc/final</td><td>{wilson_interval(7, 10).format(3)}</td>" in html
    ax = report.comparison_plot([report.load_run(run)]).fig.axes[0]
    assert ax.get_title("left") == "rates (0-1) (test split, after step 3)"


def test_comparison_puts_each_policy_next_to_its_baselines():
    mlpo = report.comparison_panels(mlpo_eval())
    assert [p.title for p in mlpo] == ["rates (0-1)", "reward"]  # rates on one 0-1 axis, the reward on its own
    assert mlpo[0].unit and not mlpo[1].unit
    assert [[name_of(r) for r in g] for g in mlpo[0].groups] == [
        ["acc/final", "acc/untrained_final", "acc/majority"], ["lenient/acc/final", "lenient/acc/untrained_final"]]
    assert [r.filled for g in mlpo[0].groups for r in g] == [True, False, False, True, False]  # baselines hollow
    iv = wilson_interval(3, 10)
    assert rows(mlpo[0])[1] == ("acc/untrained_final", 0.3, iv.low, iv.high, 10, False)
    assert mlpo[0].groups[0][0].label == "acc/final (n=10)  0.70 [0.40, 0.89]"  # n in the label
    # GRPO: base/<metric> (learnt from diff/correct-base/correct) next to its namesake; a metric
    # without an interval is a point alone
    grpo = {**outcome_metrics({"correct": AFTER, "base/correct": BEFORE, "format": VOTE, "base/format": VOTE,
                               "reward": [x + 0.5 for x in AFTER], "base/reward": [x + 0.5 for x in BEFORE]},
                              [("correct", "base/correct"), ("reward", "base/reward")]), "solved": 0.25}
    panels = {p.title: [[name_of(r) for r in g] for g in p.groups] for p in report.comparison_panels(grpo)}
    assert panels == {"rates (0-1)": [["correct", "base/correct"], ["format", "base/format"], ["solved"]],
                      "reward": [["reward", "base/reward"]]}
    # MALT: a baseline's own baseline follows it
    malt = {"mv/gvr": 0.5, "mv/g": 0.4, "baseline/mv/gvr": 0.3, "baseline/mv/g": 0.2,
            "diff/mv/gvr-baseline/mv/gvr": 0.2, "diff/mv/gvr-baseline/mv/g": 0.3, "diff/mv/gvr-mv/g": 0.1}
    assert report.policy_clusters(malt) == [["mv/gvr", "baseline/mv/gvr", "mv/g", "baseline/mv/g"]]
    # a - b and b - a both declared: one cluster, each metric once
    assert [sorted(c) for c in report.policy_clusters({"a": 0.1, "b": 0.2, "diff/a-b": -0.1, "diff/b-a": 0.1})] \
        == [["a", "b"]]


def test_forest_has_one_row_per_paired_difference():
    # a difference over one task: no interval (its bounds were nan, which metrics.jsonl drops)
    metrics = {**mlpo_eval(), "base/reward": 0.5, "diff/reward-base/reward": 1.0, "diff/reward-base/reward/n": 1}
    rates, reward = report.forest_panels(metrics)
    assert (rates.title, reward.title) == ("differences, rates (0-1)", "differences, reward")
    assert rates.zero and len(rates.groups) == 1
    expected = []
    for a, b in MLPO_DIFFS:
        iv = paired_difference(AFTER, VOTE if b == "acc/majority" else BEFORE)
        expected.append((f"{a} - {b}", pytest.approx(iv.estimate), pytest.approx(iv.low), pytest.approx(iv.high),
                         10, iv.low > 0 or iv.high < 0))
    assert sorted(rows(rates)) == sorted(expected, key=lambda row: row[0])
    assert sorted(r[-1] for r in rows(rates)) == [False, True, True]  # filled: the interval excludes 0
    assert "acc/final - acc/untrained_final (n=10)  +0.40 [+0.03, +0.77]" in [r.label for r in rates.groups[0]]
    (label, est, low, high, n, filled), = rows(reward)
    assert (label, est, n, filled) == ("reward - base/reward", 1.0, 1, False) and math.isnan(low) and math.isnan(high)
    # drawn: one marker per row, an interval bar only where there is an interval, the line at 0
    run = report.Run(path=Path("r"), table={f"test/{k}": {3: v} for k, v in metrics.items()}, label="r")
    rates_ax, reward_ax = report.forest_plot([run]).fig.axes
    assert len(rates_ax.collections) == 3 and not reward_ax.collections
    markers = [line for line in reward_ax.lines if line.get_marker() == "o"]
    assert [tuple(m.get_xdata()) for m in markers] == [(1.0,)]
    assert any(tuple(line.get_xdata()) == (0, 0) for line in reward_ax.lines)


def test_several_evaluations_plus_test(tmp_path):
    run_dir = final_run(tmp_path, "evals", trainer_records(6, eval_steps=(2, 4, 6)))
    pngs = check_report(report.write_report([run_dir]))
    assert {"comparison.png", "forest.png", "eval.png"} <= set(pngs)
    run = report.load_run(run_dir)
    report.label_runs([run])
    ev = report.final_evaluation(run)
    assert (ev.prefix, ev.step) == ("test", 6) and ev.metrics["acc/final"] == 0.7  # the test split, not eval/
    acc = next(ax for ax in report.eval_plot([run]).fig.axes if ax.get_title() == "acc")
    assert [list(line.get_xdata()) for line in acc.lines if line.get_label() == "final"] == [[2, 4, 6]]
    # without the test evaluation the last eval/ step is the final one
    no_test = report.load_run(final_run(tmp_path, "no_test", trainer_records(6, eval_steps=(2, 4, 6), test=False)))
    ev = report.final_evaluation(no_test)
    assert (ev.prefix, ev.step, ev.metrics["acc/final"]) == ("eval", 6, 0.5)  # BEFORE[:6] + AFTER[6:]


def test_one_eval_step_draws_no_eval_figure(tmp_path):
    run = report.load_run(final_run(tmp_path, "one", trainer_records(3, eval_steps=(3,), test=False)))
    report.label_runs([run])
    assert report.eval_plot([run]) is None
    titles = [ax.get_title("left") for ax in report.comparison_plot([run]).fig.axes]
    assert titles == ["rates (0-1) (evaluation at step 3)", "reward (evaluation at step 3)"]


def test_forest_rows_grouped_per_run(tmp_path):
    a = final_run(tmp_path, "a", trainer_records(3))
    b = final_run(tmp_path, "b", trainer_records(3, eval_steps=(3,), test=False))
    runs = [report.load_run(a), report.load_run(b)]
    report.label_runs(runs)
    axes = report.forest_plot(runs).fig.axes
    assert [ax.get_title("left") for ax in axes] == ["a: differences, rates (0-1) (test split, after step 3)",
                                               "b: differences, rates (0-1) (evaluation at step 3)"]
    assert [len(ax.get_yticklabels()) for ax in axes] == [3, 3]


# ---- the loggers: same scalar names everywhere ----------------------------------------------------
def wandb_history(wandb_dir: Path) -> list[dict]:
    """History rows from an offline run's .wandb file (a LevelDB-style log of protobuf Records:
    7-byte header, 32 KiB blocks of chunks with a crc32/length/type header)."""
    from wandb.proto import wandb_internal_pb2 as pb
    files = glob.glob(str(wandb_dir / "wandb" / "offline-run-*" / "run-*.wandb"))
    assert len(files) == 1, files
    data = Path(files[0]).read_bytes()
    assert data[:4] == b":W&B"
    pos, chunk, rows = 7, b"", []
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # block trailer padding
            pos += 32768 - pos % 32768
            continue
        _, n, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and n == 0:
            break
        chunk += data[pos + 7:pos + 7 + n]
        pos += 7 + n
        if kind in (1, 4):  # FULL or LAST chunk: a whole record
            rec = pb.Record()
            rec.ParseFromString(chunk)
            chunk = b""
            if rec.WhichOneof("record_type") == "history":
                rows.append({(i.key or "/".join(i.nested_key)): json.loads(i.value_json) for i in rec.history.item})
    return rows


def tensorboard_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    acc = EventAccumulator(str(run_dir / "tensorboard"))
    acc.Reload()
    return {tag: {e.step: e.value for e in acc.Scalars(tag)} for tag in acc.Tags()["scalars"]}


def jsonl_scalars(run_dir: Path) -> dict[str, dict[int, float]]:
    out: dict[str, dict[int, float]] = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        rec = json.loads(line)
        for k, v in rec.items():
            if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool):
                out.setdefault(k, {})[rec["step"]] = v
    return out


def assert_same_scalars(run_dir: Path, wandb_dir: Path):
    expected = jsonl_scalars(run_dir)
    assert expected
    wb: dict[str, dict[int, float]] = {}
    for row in wandb_history(wandb_dir):
        for k, v in row.items():
            if not k.startswith("_"):
                wb.setdefault(k, {})[row["_step"]] = v
    tb = tensorboard_scalars(run_dir)
    assert set(wb) == set(expected) == set(tb)
    for k, by_step in expected.items():
        assert wb[k] == pytest.approx(by_step), k
        assert tb[k] == pytest.approx(by_step, rel=1e-6, abs=1e-6), k  # TensorBoard stores float32


def test_wandb_offline_logs_the_jsonl_scalars(tmp_path, monkeypatch):
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path / "wb"))
    (tmp_path / "wb").mkdir()
    run = tmp_path / "run"
    run.mkdir()
    (run / "config.yaml").write_text(yaml.safe_dump({"algo": {"name": "grpo"}}))
    logger = MetricsLogger(run, ["tensorboard", "wandb"])
    for r in grpo_records(6):
        logger.log({**r, "eval/missing": float("nan"), "flag": True, "note": "text"})
    logger.close()
    assert_same_scalars(run, tmp_path / "wb")


# ---- a real tiny-model run (Ray + vLLM + DeepSpeed) -----------------------------------------------
@pytest.fixture(scope="module")
def real_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("report_run")
    out, wb = root / "run", root / "wandb_files"
    wb.mkdir()
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_DIR": str(wb)}
    cmd = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "trainer.steps=3",
           "trainer.eval_every=1", "trainer.eval_size=4", "trainer.batch_size=2", "algo.group_size=4",
           "rollout.max_new_tokens=16", "trainer.progress=false", "trainer.loggers=[tensorboard,wandb]",
           f"trainer.output_dir={out}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1200, env=env)
    assert r.returncode == 0, f"STDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    return out, wb


@pytest.mark.engine
def test_real_run_writes_its_report(real_run):
    out, _ = real_run
    index = out / "report" / "index.html"
    pngs = check_report(index)
    assert {"reward.png", "eval.png", "time.png", "throughput.png"} <= set(pngs)
    assert f"report: {index}" in (out / "train.log").read_text()
    html = index.read_text()
    assert "class='note'" not in html  # a finished run: nothing missing
    assert ">grpo<" in html and ">toy<" in html


@pytest.mark.engine
def test_real_run_wandb_offline_same_scalars(real_run):
    out, wb = real_run
    assert_same_scalars(out, wb)
    assert {"reward/mean", "loss", "time/train", "eval/reward"} <= set(jsonl_scalars(out))


def test_timeline_shows_each_side_per_step_and_wall_time_is_no_phase(tmp_path):
    # an overlapped run: step 2's rollout [1.0, 2.0] under step 1's training [1.1, 2.1]
    recs = [{"step": s, "reward/mean": 0.5, "time/train": 1.0, "time/step": 1.2, "time/wall": 2.2 * s,
             "span/collect/start": s - 1.0, "span/collect/end": s, "span/train/start": s + 0.1,
             "span/train/end": s + 1.1, "span/sync/start": s + 1.1, "span/sync/end": s + 1.2} for s in (1, 2, 3)]
    run = make_run(tmp_path / "a", recs)
    index = report.write_report([run])
    assert "timeline.png" in check_report(index)
    plot = report.timeline_plot([report.load_run(run)])
    labels = [t.get_text() for t in plot.fig.axes[0].get_yticklabels()]
    assert labels == ["rollout", "learner", "push", "eval / save"]
    assert len(plot.fig.axes[0].collections) == 3  # rollout, learner and push bars; nothing evaluated
    assert "wall" not in report._phases(report.load_run(run))[0]
