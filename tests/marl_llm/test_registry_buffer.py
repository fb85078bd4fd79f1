"""Registries reject duplicates and unknown names; the trajectory buffer round-trips episodes."""
import json

import pytest

from marl_llm.advantages import group_advantages
from marl_llm.buffer import TrajectoryBuffer
from marl_llm.checkpoint import TaskStream
from marl_llm.registry import ALGORITHMS, ENVS, Registry, register_algorithm
from marl_llm.types import Episode, GenerationRequest, Sample, Turn


def test_builtin_plugins_registered():
    assert "grpo" in ALGORITHMS.names()
    assert "toy" in ENVS.names()


def test_duplicate_registration_rejected():
    with pytest.raises(ValueError, match="already registered"):
        @register_algorithm("grpo")
        class Other:  # noqa: F811
            pass


def test_unknown_name_lists_registered():
    with pytest.raises(KeyError, match="registered: .*grpo"):
        ALGORITHMS.get("nope")


def test_entry_point_plugins_load(monkeypatch, tmp_path):
    """A plugin shipped by another package is found through its entry point group."""
    import importlib.metadata as md
    import sys
    (tmp_path / "myplug.py").write_text(
        "from marl_llm.registry import register_algorithm\n"
        "@register_algorithm('my_algo')\nclass MyAlgo:\n    pass\n")
    sys.path.insert(0, str(tmp_path))
    ep = md.EntryPoint(name="my_algo", value="myplug", group="marl_llm.test_algos")
    reg = Registry("algorithm", "algorithms", "marl_llm.test_algos")
    monkeypatch.setattr("marl_llm.registry.entry_points", lambda group: [ep] if group == "marl_llm.test_algos" else [])
    import marl_llm.registry as r
    monkeypatch.setattr(r, "register_algorithm", reg.register)
    reg.load_plugins()
    assert "my_algo" in reg.names()
    sys.path.remove(str(tmp_path))


def _episode(i, parent=None):
    t1 = Turn(agent="generator", policy="gen", prompt_ids=[1, 2], completion_ids=[3, 4], text="a",
              logprobs=[-0.1, -0.2])
    t2 = Turn(agent="verifier", policy="ver", prompt_ids=[5], completion_ids=[6], text="b", parent=t1.id,
              round=1)
    return Episode(task={"id": i, "question": "q"}, turns=[t1, t2], reward=float(i), components={"c": 1.0},
                   group="g", step=i)


def test_buffer_roundtrip_and_crash_safety(tmp_path):
    path = tmp_path / "buffer.jsonl"
    buf = TrajectoryBuffer(path)
    buf.add([_episode(0), _episode(1)])
    buf.add([_episode(2)])
    loaded = TrajectoryBuffer.load(path)
    assert [e.reward for e in loaded] == [0.0, 1.0, 2.0]
    assert loaded.episodes[1].turns[1].parent == loaded.episodes[1].turns[0].id
    assert loaded.episodes[0].to_dict() == buf.episodes[0].to_dict()
    assert set(loaded.turns_by_policy()) == {"gen", "ver"}
    # resume drops what came after the checkpoint
    loaded.truncate_to(2)
    assert len(TrajectoryBuffer.load(path)) == 2
    # a corrupt line is reported with its location, not skipped
    with open(path, "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="buffer.jsonl:3"):
        TrajectoryBuffer.load(path)


def test_buffer_keep_last_bounds_memory_not_disk(tmp_path):
    buf = TrajectoryBuffer(tmp_path / "b.jsonl", keep_last=2)
    buf.add([_episode(i) for i in range(5)])
    assert len(buf) == 2 and buf.total == 5
    assert len((tmp_path / "b.jsonl").read_text().splitlines()) == 5


def test_buffer_read_gives_every_stored_episode(tmp_path):
    buf = TrajectoryBuffer(tmp_path / "b.jsonl", keep_last=2)
    buf.add([_episode(i) for i in range(5)])
    assert [e.reward for e in buf.read()] == [0.0, 1.0, 2.0, 3.0, 4.0]  # the file's, beyond keep_last
    mem = TrajectoryBuffer()
    mem.add([_episode(7)])
    assert [e.reward for e in mem.read()] == [7.0]                     # no file: the episodes held
    with open(tmp_path / "b.jsonl", "a") as f:
        f.write("{not json\n")
    with pytest.raises(ValueError, match="b.jsonl:6"):
        list(buf.read())


def test_group_advantages():
    assert group_advantages([1.0, 0.0, 0.0, 1.0]) == [0.5, -0.5, -0.5, 0.5]
    z = group_advantages([1.0, 0.0], std_normalize=True)
    assert z[0] == pytest.approx(1.0, abs=1e-5) and z[1] == pytest.approx(-1.0, abs=1e-5)
    assert group_advantages([30.0, 0.0], clamp=10) == [10.0, -10.0]
    assert group_advantages([2.0, 2.0]) == [0.0, 0.0]


def test_task_stream_resumes_exactly():
    tasks = [{"id": i} for i in range(10)]
    a = TaskStream(tasks, 4, seed=3)
    seen = [a.next_batch() for _ in range(3)]  # crosses an epoch boundary
    b = TaskStream(tasks, 4, seed=3)
    b.load_state_dict(json.loads(json.dumps(a.state_dict())))
    assert a.next_batch() == b.next_batch()
    assert sorted(t["id"] for t in seen[0] + seen[1] + seen[2][:2]) == list(range(10))


def test_types_reject_bad_input():
    with pytest.raises(ValueError):
        GenerationRequest()
    with pytest.raises(ValueError):
        Sample([1], [])
