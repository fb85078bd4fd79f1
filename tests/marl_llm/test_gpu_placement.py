"""GPU requests are right before anyone has a GPU: on a Ray instance with logical GPUs (no CUDA; in
a subprocess), actors asked for with `rollout_gpus` / `learner_gpus` get disjoint devices (split
layout) or share one (colocated, fractions), and Ray sets each one's CUDA_VISIBLE_DEVICES
accordingly; so do all the actors of each paper preset."""
import json
import os
import subprocess
import sys

import pytest

from marl_llm.cluster import learner_gpus, rollout_gpus
from marl_llm.config import LearnerConfig, RolloutConfig


def test_requests_follow_the_cluster_and_the_config():
    gpu, cpu = {"CPU": 8, "GPU": 4}, {"CPU": 8}
    assert rollout_gpus(RolloutConfig(), cpu) == 0 and learner_gpus(LearnerConfig(), cpu) == 0
    assert rollout_gpus(RolloutConfig(tensor_parallel_size=2), gpu) == 2
    assert learner_gpus(LearnerConfig(), gpu) == 1
    assert rollout_gpus(RolloutConfig(num_gpus=0.5), gpu) == 0.5 and learner_gpus(LearnerConfig(num_gpus=0.5), gpu) == 0.5


PRESETS = ["mlpo_paper", "magrpo_writing_paper", "magrpo_coding_paper", "malt_paper"]


def _probe(ray):
    @ray.remote
    class Probe:
        def devices(self):
            return sorted(str(int(i)) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]), \
                os.environ.get("CUDA_VISIBLE_DEVICES")
    return Probe


def _layouts(ray) -> dict:
    """Split: an engine with tensor_parallel_size=2 and two learner ranks; colocated: an engine and
    a rank at 0.5 GPU each. Each actor's (GPU ids, CUDA_VISIBLE_DEVICES)."""
    res, probe = ray.cluster_resources(), _probe(ray)
    split = [probe.options(num_cpus=0, num_gpus=rollout_gpus(RolloutConfig(tensor_parallel_size=2), res)).remote()]
    split += [probe.options(num_cpus=0, num_gpus=learner_gpus(LearnerConfig(), res)).remote() for _ in range(2)]
    out = {"split": ray.get([a.devices.remote() for a in split])}
    for a in split:
        ray.kill(a)
    colocated = [probe.options(num_cpus=0, num_gpus=rollout_gpus(RolloutConfig(num_gpus=0.5), res)).remote(),
                 probe.options(num_cpus=0, num_gpus=learner_gpus(LearnerConfig(num_gpus=0.5), res)).remote()]
    out["colocated"] = ray.get([a.devices.remote() for a in colocated])
    for a in colocated:
        ray.kill(a)
    return out


def _preset(ray, preset: str) -> dict:
    """Every actor a paper preset starts (the GPU plan's list, in `build_policies` order: nothing
    loaded), asked for from Ray with the same requests; learner ranks through a placement group
    per learner group, as LearnerGroup reserves them."""
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    from marl_llm.api import compose
    from marl_llm.gpu_plan import GpuCluster, plan_run, run_actors
    from marl_llm.preflight import policy_specs

    run = compose(f"experiment={preset}")
    cluster = GpuCluster(1, 8, 80.0, "test")
    specs = policy_specs(run)
    actors = run_actors(specs, run, cluster)
    probe, handles, groups = _probe(ray), [], []
    for a in sorted(actors, key=lambda a: a.role != "rollout"):
        if a.role == "rollout":
            handles.append((a, probe.options(num_cpus=0, num_gpus=a.gpus).remote()))
            continue
        policy, rank = a.name.split()[1], int(a.name.split()[-1])
        if rank == 0:
            n = sum(1 for b in actors if b.role == "learner" and b.name.split()[1] == policy)
            groups.append(placement_group([{"GPU": a.gpus}] * n, strategy="PACK"))
            ray.get(groups[-1].ready(), timeout=60)
        handles.append((a, probe.options(num_cpus=0, num_gpus=a.gpus,
                                         scheduling_strategy=PlacementGroupSchedulingStrategy(groups[-1], rank)).remote()))
    seen = ray.get([h.devices.remote() for _, h in handles], timeout=120)
    for _, h in handles:
        ray.kill(h)
    for g in groups:
        remove_placement_group(g)
    return {"actors": [(a.name, a.gpus, ids, visible) for (a, _), (ids, visible) in zip(handles, seen)],
            "plan_devices": len(plan_run(specs, run, cluster).devices)}


def probe_all() -> dict:
    """Run in a fresh process (the tests' session may hold a Ray of its own): Ray with 8 logical
    GPUs and no CUDA."""
    import ray

    ray.init(address="local", num_cpus=4, num_gpus=8, include_dashboard=False, namespace="gpu_placement_test")
    try:
        return {**_layouts(ray), **{p: _preset(ray, p) for p in PRESETS}}
    finally:
        ray.shutdown()


@pytest.fixture(scope="module")
def probed():
    code = "import json, test_gpu_placement as t; print('PROBED=' + json.dumps(t.probe_all()))"
    here = os.path.dirname(os.path.abspath(__file__))
    r = subprocess.run([sys.executable, "-c", code], cwd=here, capture_output=True, text=True, timeout=600,
                       env={**os.environ, "RAY_AUTH_MODE": "disabled"})
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.split("PROBED=", 1)[1])


@pytest.mark.engine  # Ray with logical GPUs, in a subprocess
def test_split_layout_gives_disjoint_devices(probed):
    ids = [set(devices) for devices, _ in probed["split"]]
    assert len(ids[0]) == 2 and all(len(i) == 1 for i in ids[1:])
    assert len(set.union(*ids)) == 4  # four devices, none shared
    for devices, visible in probed["split"]:
        assert visible == ",".join(devices)


@pytest.mark.engine
def test_colocated_fractions_share_one_device(probed):
    (e_ids, e_vis), (r_ids, r_vis) = probed["colocated"]
    assert e_ids == r_ids and len(e_ids) == 1 and e_vis == r_vis == e_ids[0]


@pytest.mark.engine
@pytest.mark.parametrize("preset", PRESETS)
def test_paper_presets_get_the_devices_their_plan_says(probed, preset):
    """Each actor gets devices of its own, Ray sets its CUDA_VISIBLE_DEVICES to them, and the
    devices in use are the ones the plan counts."""
    used: dict[str, str] = {}
    for name, gpus, devices, visible in probed[preset]["actors"]:
        assert visible == ",".join(devices) and len(devices) == max(1, int(gpus)), (name, devices, visible)
        for d in devices:
            assert d not in used or gpus < 1, f"{name} shares GPU {d} with {used[d]}"
            used[d] = name
    assert len(used) == probed[preset]["plan_devices"]
