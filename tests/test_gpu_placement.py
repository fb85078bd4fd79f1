"""GPU requests are right before anyone has a GPU: on a Ray instance with logical GPUs (no CUDA),
actors asked for with `rollout_gpus` / `learner_gpus` get disjoint devices (split layout) or share
one (colocated, fractions), and Ray sets each one's CUDA_VISIBLE_DEVICES accordingly."""
import os

import pytest

from marl_llm.cluster import learner_gpus, rollout_gpus
from marl_llm.config import LearnerConfig, RolloutConfig


def test_requests_follow_the_cluster_and_the_config():
    gpu, cpu = {"CPU": 8, "GPU": 4}, {"CPU": 8}
    assert rollout_gpus(RolloutConfig(), cpu) == 0 and learner_gpus(LearnerConfig(), cpu) == 0
    assert rollout_gpus(RolloutConfig(tensor_parallel_size=2), gpu) == 2
    assert learner_gpus(LearnerConfig(), gpu) == 1
    assert rollout_gpus(RolloutConfig(num_gpus=0.5), gpu) == 0.5 and learner_gpus(LearnerConfig(num_gpus=0.5), gpu) == 0.5


@pytest.fixture(scope="module")
def ray_with_logical_gpus():
    ray = pytest.importorskip("ray")
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    ray.init(num_cpus=4, num_gpus=4, include_dashboard=False, namespace="gpu_placement_test")
    yield ray
    ray.shutdown()


def _probe(ray):
    @ray.remote
    class Probe:
        def devices(self):
            return sorted(str(int(i)) for i in ray.get_runtime_context().get_accelerator_ids()["GPU"]), \
                os.environ.get("CUDA_VISIBLE_DEVICES")
    return Probe


def test_split_layout_gives_disjoint_devices(ray_with_logical_gpus):
    ray = ray_with_logical_gpus
    res = ray.cluster_resources()
    probe = _probe(ray)
    engine = probe.options(num_cpus=0, num_gpus=rollout_gpus(RolloutConfig(tensor_parallel_size=2), res)).remote()
    ranks = [probe.options(num_cpus=0, num_gpus=learner_gpus(LearnerConfig(), res)).remote() for _ in range(2)]
    seen = ray.get([a.devices.remote() for a in [engine, *ranks]])
    ids = [set(s[0]) for s in seen]
    assert len(ids[0]) == 2 and all(len(i) == 1 for i in ids[1:])
    assert set.union(*ids) == {"0", "1", "2", "3"}  # four devices, none shared
    for devices, visible in seen:
        assert visible == ",".join(devices)
    for a in [engine, *ranks]:
        ray.kill(a)


def test_colocated_fractions_share_one_device(ray_with_logical_gpus):
    ray = ray_with_logical_gpus
    res = ray.cluster_resources()
    probe = _probe(ray)
    engine = probe.options(num_cpus=0, num_gpus=rollout_gpus(RolloutConfig(num_gpus=0.5), res)).remote()
    rank = probe.options(num_cpus=0, num_gpus=learner_gpus(LearnerConfig(num_gpus=0.5), res)).remote()
    (e_ids, e_vis), (r_ids, r_vis) = ray.get([engine.devices.remote(), rank.devices.remote()])
    assert e_ids == r_ids and len(e_ids) == 1 and e_vis == r_vis == e_ids[0]
    for a in (engine, rank):
        ray.kill(a)
