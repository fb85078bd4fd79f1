"""The CPU recipes (conf/experiment/cpu_*.yaml) run their first step end to end on the real
engines with overrides that make them short, and close with a summary that holds the paired
comparisons and intervals of their evaluation. Slow: SmolLM2 on vLLM + DeepSpeed, minutes each."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.engine]

SHORT = ["trainer.steps=1", "trainer.eval_every=1", "trainer.save_every=1", "trainer.eval_size=4",
         "trainer.progress=false", "trainer.loggers=[]", "rollout.max_new_tokens=32"]


@pytest.mark.parametrize("recipe, overrides, comparison", [
    # the main job (no experiment): MLPO with the leader reading the team's final answers
    (None, ["trainer.batch_size=2", "algo.group_size=4", "algo.max_train_tasks=4", "algo.easy_threshold=null"],
     "acc/final - acc/untrained_final = "),
    ("cpu_grpo_math", ["trainer.batch_size=2", "algo.group_size=4"], "correct - base/correct = "),
    ("cpu_mlpo_math", ["trainer.batch_size=2", "algo.group_size=4", "algo.max_train_tasks=4",
                       "algo.easy_threshold=null", "algo.sft_samples=1"], "acc/final - acc/untrained_final = "),
    ("cpu_malt_math", ["trainer.batch_size=1", "algo.branching=2", "algo.chains=2", "algo.sft_epochs=1",
                       "algo.dpo_epochs=1"], "mv/gvr - baseline/mv/g = "),
    ("cpu_magrpo_writing", ["trainer.batch_size=1", "algo.group_size=2"], "reward - naive/reward = "),
    ("cpu_magrpo_coding", ["trainer.batch_size=1", "algo.group_size=2"], "reward - naive/reward = "),
], ids=["main_job", "cpu_grpo_math", "cpu_mlpo_math", "cpu_malt_math", "cpu_magrpo_writing", "cpu_magrpo_coding"])
def test_recipe_first_step(tmp_path, recipe, overrides, comparison):
    cmd = [sys.executable, "-m", "marl_llm.train", *([f"+experiment={recipe}"] if recipe else []), *SHORT,
           *overrides, f"trainer.output_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    # every number comes from the 4 held-out tasks (MLPO's "when the team is all wrong" from a subset)
    assert any(line.startswith(comparison) and line.endswith("n=4") for line in summary["comparisons"]), summary
    assert summary["intervals"] and all(v.endswith("n=4") for k, v in summary["intervals"].items()
                                        if "when_team_all_wrong" not in k)
    assert summary["wall_clock_s"] > 0 and summary["checkpoint"]
    if recipe is None:  # the main job's leader read one line per member's final answer, through the engines
        row = json.loads((tmp_path / "eval/test/step_1/replies/acc.final.jsonl").read_text().splitlines()[0])
        assert "Your team's final answers" in row["prompt"][-1]["content"] and "Agent 3: " in row["prompt"][-1]["content"]
