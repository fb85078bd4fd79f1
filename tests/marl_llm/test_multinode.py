"""Several Ray nodes on this machine (`ray.cluster_utils.Cluster`: one raylet per node, disjoint
resources): learner ranks spread over two nodes, rollout workers on a third, the weight push
across them; the losses equal a one-node run's. A lost node (its raylet and workers killed
mid-run) stops the driver with one line naming it, and the run resumes on the nodes that remain."""
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

from test_faults import wait_for_checkpoint

pytestmark = pytest.mark.engine  # training runs and Ray clusters

ROOT = Path(__file__).resolve().parents[2]
RUN = [sys.executable, "-m", "marl_llm.train", "algo=grpo", "env=toy", "model=tiny", "rollout.backend=vllm",
       "learner.num_ranks=2", "trainer.batch_size=2", "algo.group_size=4", "rollout.max_new_tokens=16",
       "algo.eval_baselines=[]", "trainer.eval_every=0", "trainer.test=false", "trainer.report=false",
       "trainer.progress=false"]
# learner ranks only where `learner_node` is, rollout workers only where `rollout_node` is
PLACED = ["learner.resources={learner_node: 1}", "rollout.resources={rollout_node: 1}"]


@pytest.fixture
def ray_cluster():
    """A head (no CPUs: only the GCS), two learner nodes and a rollout node."""
    os.environ["RAY_AUTH_MODE"] = "disabled"
    from ray.cluster_utils import Cluster

    store = 150 * 2**20
    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 0, "object_store_memory": store})
    nodes = {name: cluster.add_node(num_cpus=2, object_store_memory=store, resources=res)
             for name, res in (("learner_a", {"learner_node": 2}), ("learner_b", {"learner_node": 2}),
                               ("rollout", {"rollout_node": 2}))}
    cluster.wait_for_nodes()
    yield cluster, nodes
    cluster.shutdown()


def losses(out: Path) -> list[float]:
    return [json.loads(l)["loss"] for l in (out / "metrics.jsonl").read_text().splitlines()]


def node_ids(log: str, pattern: str) -> set[str]:
    return set(re.findall(pattern, log))


@pytest.mark.slow
def test_learner_ranks_on_two_nodes_match_a_one_node_run(ray_cluster, tmp_path):
    cluster, nodes = ray_cluster
    multi, single = tmp_path / "multi", tmp_path / "single"
    r = subprocess.run(RUN + PLACED + ["cluster=ray", f"cluster.address={cluster.address}", "learner.placement=spread",
                                       "trainer.steps=3", f"trainer.output_dir={multi}"],
                       cwd=ROOT, capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    log = (multi / "train.log").read_text()
    ranks = re.search(r"nodes: rank 0 (\S+), rank 1 (\S+) \(learner.placement=spread\)", log)
    assert ranks and ranks.group(1) != ranks.group(2), log[-2000:]  # one rank on each learner node
    want = {nodes["learner_a"].node_id[:8], nodes["learner_b"].node_id[:8]}
    assert {ranks.group(1).split("/")[1], ranks.group(2).split("/")[1]} == want
    engine = re.search(r"policy 'policy': 1 rollout worker\(s\) \[vllm\] on nodes (\S+),", log)
    assert engine and engine.group(1).split("/")[1] == nodes["rollout"].node_id[:8]
    # the same run on one node (a local Ray instance): the same losses
    r = subprocess.run(RUN + ["trainer.steps=3", f"trainer.output_dir={single}"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    assert losses(multi) == pytest.approx(losses(single), rel=1e-4, abs=1e-6), (losses(multi), losses(single))


@pytest.mark.slow
def test_a_lost_node_stops_the_run_and_it_resumes_on_the_nodes_left(ray_cluster, tmp_path):
    cluster, nodes = ray_cluster
    out = tmp_path / "run"
    base = RUN + PLACED + ["cluster=ray", f"cluster.address={cluster.address}", "learner.placement=spread",
                           "trainer.save_every=1", "learner.timeout_s=30", "rollout.timeout_s=30",
                           f"trainer.output_dir={out}"]
    proc = subprocess.Popen(base + ["trainer.steps=40"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True)
    wait_for_checkpoint(proc, out, 1)
    lost = nodes["learner_a"]
    t0 = time.time()
    cluster.remove_node(lost)  # its raylet and every worker on it, as when a machine goes away
    _, err = proc.communicate(timeout=300)
    stopped = time.time() - t0
    lines = [l for l in err.strip().splitlines() if l.startswith("error: ")]
    assert proc.returncode == 1 and len(lines) == 1, err[-3000:]
    assert f"node 127.0.0.1/{lost.node_id[:8]}" in lines[0] or lost.node_id[:8] in lines[0], lines[0]
    assert stopped < 30 + 60, stopped
    print(f"\nstopped {stopped:.1f}s after the node was lost: {lines[0]}")
    # resume on what is left: both ranks fit on learner_b (learner_node: 2)
    last = max(int(d.name.split("_")[1]) for d in (out / "checkpoints").glob("step_*"))
    r = subprocess.run(base + [f"trainer.steps={last + 1}", "trainer.resume=true"], cwd=ROOT, capture_output=True,
                       text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    steps = [json.loads(l)["step"] for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert steps == list(range(1, last + 2)), steps
