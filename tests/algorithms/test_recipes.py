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
    ("cpu_grpo_math", ["trainer.batch_size=2", "algo.group_size=4"], "correct - base/correct = "),
    ("cpu_mlpo_math", ["trainer.batch_size=2", "algo.group_size=4", "algo.max_train_tasks=4",
                       "algo.easy_threshold=null", "algo.sft_samples=1"], "acc/final - acc/untrained_final = "),
    ("cpu_malt_math", ["trainer.batch_size=1", "algo.branching=2", "algo.chains=2", "algo.sft_epochs=1",
                       "algo.dpo_epochs=1"], "mv/gvr - baseline/mv/gvr = "),
    ("cpu_magrpo_writing", ["trainer.batch_size=1", "algo.group_size=2"], "reward - naive/reward = "),
    ("cpu_magrpo_coding", ["trainer.batch_size=1", "algo.group_size=2"], "reward - naive/reward = "),
])
def test_recipe_first_step(tmp_path, recipe, overrides, comparison):
    cmd = [sys.executable, "-m", "marl_llm.train", f"+experiment={recipe}", *SHORT, *overrides,
           f"trainer.output_dir={tmp_path}"]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    assert r.returncode == 0, f"{' '.join(cmd)}\nSTDOUT:\n{r.stdout[-3000:]}\nSTDERR:\n{r.stderr[-6000:]}"
    summary = json.loads((tmp_path / "summary.json").read_text())
    # every number comes from the 4 held-out tasks (MLPO's "when the team is all wrong" from a subset)
    assert any(line.startswith(comparison) and line.endswith("n=4") for line in summary["comparisons"]), summary
    assert summary["intervals"] and all(v.endswith("n=4") for k, v in summary["intervals"].items()
                                        if "when_team_all_wrong" not in k)
    assert summary["wall_clock_s"] > 0 and summary["checkpoint"]
