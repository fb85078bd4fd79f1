"""Shared test setup: offline, one thread per process, Ray on loopback, tiny models built once.

Two tiers (setup.cfg's markers): a test that starts an engine (Ray, vLLM, DeepSpeed) or runs the
project's command line in a subprocess (`python -m marl_llm.train`, ...) is marked `engine`;
`make test-unit` runs the others (`-m "not engine and not slow"`, under a minute). Users of the
`ray_session` fixture are marked here; everything else is marked in its file (`pytestmark =
pytest.mark.engine` for a file of engine tests). A test NOT marked `engine` that starts one anyway
fails (`_UnitGuard`), so the unit tier cannot slowly fill up with engines.

The folders mirror the package: tests/algorithms, tests/envs, tests/marl_llm (the engine and the
framework), tests/examples, tests/bench; `helpers.py` (fakes shared by the algorithm tests) and
`data/` (small dataset files) sit here.
"""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("RAY_AUTH_MODE", "disabled")

from marl_llm import runtime  # noqa: E402

runtime.apply_defaults()

import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402

import pytest  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))  # `from helpers import ...` in every folder

ENGINE_FIXTURES = ("ray_session",)  # fixtures that start an engine: a test using one is an engine test
HOW_TO_MARK = "mark it @pytest.mark.engine (or `pytestmark = pytest.mark.engine` for a file of engine tests)"


@pytest.fixture(scope="session")
def tiny_model_path():
    from marl_llm.config import ModelConfig
    from marl_llm.models import resolve_model
    return resolve_model(ModelConfig(name="tiny", source="tiny"))


@pytest.fixture(scope="session")
def ray_session():
    """One local Ray instance for every test that needs actors (ray.init costs 5-10 s)."""
    import ray
    if not ray.is_initialized():
        ray.init(num_cpus=8, include_dashboard=False, namespace="marl_llm_tests",
                 runtime_env={"env_vars": runtime.actor_env()})
    yield ray
    ray.shutdown()


# ---- the engine marker and the unit tier's guard ---------------------------------------------------
@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker
def pytest_collection_modifyitems(items):
    for item in items:
        if any(f in item.fixturenames for f in ENGINE_FIXTURES):
            item.add_marker(pytest.mark.engine)


class _UnitGuard:
    """Active from the setup to the end of the teardown of every test not marked `engine`:
    - the calls that start an engine in this process (`ENGINE_STARTS`, where the module is loaded)
      and a subprocess of the project's command line (`CLI_MODULES`, the `marl-llm*` scripts: they
      launch the engines, and even one that stops at its arguments re-imports the whole stack) fail
      the test at once;
    - Ray, started here or in any child process, puts its session folder under RAY_TMPDIR, pointed
      at a folder of the guard's own: anything new there after the test fails it (a child given an
      environment without os.environ's RAY_TMPDIR escapes this check)."""

    ENGINE_STARTS = {"ray": "init", "deepspeed": "initialize", "vllm": "LLM"}
    CLI_MODULES = {"marl_llm", "marl_llm.train", "marl_llm.evaluate", "marl_llm.report", "marl_llm.envcheck",
                   "marl_llm.preflight", "bench"}  # python -m <one of these>
    root = tempfile.mkdtemp(prefix="unit-ray-")  # short: Ray's socket paths below it must stay < 108 characters

    def __init__(self, item):
        self.item, self.patch = item, pytest.MonkeyPatch()
        self.ray_tmp = tempfile.mkdtemp(prefix="", dir=self.root)  # one per test
        self.patch.setenv("RAY_TMPDIR", self.ray_tmp)
        for mod, attr in self.ENGINE_STARTS.items():
            module = sys.modules.get(mod)
            if module is not None and attr in vars(module):  # vars: never triggers a lazy import
                self.patch.setattr(module, attr, lambda *a, _what=f"{mod}.{attr}()", **k: self.refuse(_what))
        popen_init = subprocess.Popen.__init__

        def checked_popen_init(popen, args, *more, **kw):
            words = os.fsdecode(args).split() if isinstance(args, (str, bytes, os.PathLike)) else args
            names = [os.path.basename(os.fsdecode(w)) for w in words]
            if names[:1] and names[0].startswith("marl-llm") or \
                    any(a == "-m" and b in self.CLI_MODULES for a, b in zip(names, names[1:])):
                self.refuse(f"subprocess {' '.join(names[:4])} ...")
            popen_init(popen, args, *more, **kw)
        self.patch.setattr(subprocess.Popen, "__init__", checked_popen_init)

    def refuse(self, what):
        pytest.fail(f"{self.item.nodeid} starts an engine ({what}) but is not marked engine: {HOW_TO_MARK}",
                    pytrace=False)

    def check(self):
        if os.listdir(self.ray_tmp):
            pytest.fail(f"{self.item.nodeid} started Ray (here or in a child such as `python -m marl_llm.train`: "
                        f"a Ray session appeared in RAY_TMPDIR) but is not marked engine: {HOW_TO_MARK}", pytrace=False)
        os.rmdir(self.ray_tmp)


_GUARD = pytest.StashKey[_UnitGuard]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_setup(item):
    if item.get_closest_marker("engine") is None:
        item.stash[_GUARD] = _UnitGuard(item)
    return (yield)


@pytest.hookimpl(wrapper=True)
def pytest_runtest_teardown(item, nextitem):
    guard = item.stash.get(_GUARD, None)
    try:
        result = yield
    finally:
        if guard is not None:
            guard.patch.undo()
    if guard is not None:
        guard.check()
    return result


def pytest_unconfigure(config):
    shutil.rmtree(_UnitGuard.root, ignore_errors=True)
