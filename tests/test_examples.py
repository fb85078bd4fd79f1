"""The examples run as their docstrings say."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.engine
def test_custom_algorithm_plugin_trains(tmp_path):
    cmd = [sys.executable, "-m", "marl_llm.train", "plugins=[examples.custom_algorithm]",
           "hydra.searchpath=[file://examples/conf]", "algo=raft", "env=toy", "model=tiny",
           "rollout.backend=hf", "trainer.steps=1", "trainer.batch_size=2", "rollout.max_new_tokens=8",
           "trainer.progress=false", f"trainer.output_dir={tmp_path}"]
    r = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-4000:]
    rec = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
    assert rec["step"] == 1 and "raft/kept" in rec
    assert (tmp_path / "checkpoints" / "step_1" / "policy" / "config.json").is_file()


@pytest.mark.engine  # the command line in a subprocess (setup.cfg), though it stops at validation
def test_unknown_plugin_module_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, "-m", "marl_llm.train", "plugins=[no_such_module]", "env=toy",
                        f"trainer.output_dir={tmp_path}"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert r.returncode == 2 and "cannot import 'no_such_module'" in r.stderr
