"""`ray job submit` against a real local head node (loopback), running the same training job."""
import json
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine  # training runs and Ray clusters

ROOT = Path(__file__).resolve().parents[2]
RAY = str(Path(sys.executable).with_name("ray"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize("nodes", [1, 2])
def test_job_submission_trains(tmp_path, nodes):
    """One head node; with nodes=2 a second `ray start` process joins it with disjoint resources
    and the job puts both learner ranks there and the rollout workers on the head (docs/CLUSTER.md)."""
    # "0" makes `ray start --address` refuse to join ("multi-node clusters are not supported")
    env = {**os.environ, "RAY_AUTH_MODE": "disabled", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1" if nodes == 2 else "0"}
    port, dash = _free_port(), _free_port()
    temp = Path(tempfile.mkdtemp(prefix="ray", dir="/tmp"))  # unix socket paths must stay short
    start = [RAY, "start", "--head", f"--port={port}", "--dashboard-host=127.0.0.1", f"--dashboard-port={dash}",
             "--include-dashboard=true", "--node-ip-address=127.0.0.1", "--num-cpus=4",
             "--disable-usage-stats", f"--temp-dir={temp}", '--resources={"rollout_node": 4}']
    subprocess.run(start, check=True, env=env, capture_output=True, timeout=300)
    placed = []
    if nodes == 2:
        subprocess.run([RAY, "start", f"--address=127.0.0.1:{port}", "--node-ip-address=127.0.0.1", "--num-cpus=2",
                        '--resources={"learner_node": 2}', "--disable-usage-stats"],
                       check=True, env=env, capture_output=True, timeout=300)
        placed = ["learner.num_ranks=2", "learner.placement=strict_pack", "learner.resources={learner_node: 1}",
                  "rollout.resources={rollout_node: 1}"]
    try:
        out = tmp_path / "run"
        submit = [RAY, "job", "submit", "--address", f"http://127.0.0.1:{dash}", "--working-dir", str(ROOT),
                  "--", sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "cluster=ray",
                  "rollout.backend=vllm", "trainer.steps=1", "trainer.batch_size=2", "algo.group_size=2",
                  "rollout.max_new_tokens=8", "trainer.progress=false", f"trainer.output_dir={out}", *placed]
        for _ in range(30):  # the head's job agent comes up some seconds after `ray start` returns
            r = subprocess.run(submit, env=env, capture_output=True, text=True, timeout=1500)
            if "No available agent to submit job" not in r.stdout + r.stderr:
                break
            time.sleep(2)
        assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
        assert "succeeded" in r.stdout.lower()
        recs = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
        assert [x["step"] for x in recs] == [1]
        assert (out / "checkpoints" / "step_1" / "policy" / "config.json").is_file()
        log = (out / "train.log").read_text()
        assert "joined Ray cluster" in log
        if nodes == 2:  # the ranks on the joined node, the engines on the head: two distinct nodes
            ranks = re.search(r"nodes: rank 0 (\S+), rank 1 (\S+) ", log)
            engine = re.search(r"policy 'policy': 1 rollout worker\(s\) \[vllm\] on nodes (\S+),", log)
            assert ranks and engine and ranks.group(1) == ranks.group(2) != engine.group(1), log[-3000:]
    finally:
        subprocess.run([RAY, "stop", "--force"], env=env, capture_output=True, timeout=120)
        shutil.rmtree(temp, ignore_errors=True)
