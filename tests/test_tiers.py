"""The unit tier's guard (tests/conftest.py) is on in every test not marked `engine`, this one
included: what would start an engine, or the command line that starts them, fails the test before
anything starts."""
import os
import subprocess
import sys

import pytest

ray = pytest.importorskip("ray")  # loaded before the test runs, so the guard holds ray.init
SCRIPTS = os.path.dirname(sys.executable)


@pytest.mark.parametrize("cmd", [[sys.executable, "-m", "marl_llm.train", "--help"],
                                 f"{sys.executable} -m marl_llm evaluate --help",
                                 [sys.executable, "-m", "marl_llm.report", "--help"],
                                 [os.path.join(SCRIPTS, "marl-llm"), "list"],
                                 [sys.executable, "-m", "bench", "--only", "nope"]])
def test_the_command_line_in_a_subprocess_is_refused(cmd):
    with pytest.raises(pytest.fail.Exception, match="is not marked engine"):
        subprocess.run(cmd, shell=isinstance(cmd, str), capture_output=True)


def test_ray_init_is_refused():
    before = ray.is_initialized()  # an engine test's session fixture may hold one already
    with pytest.raises(pytest.fail.Exception, match=r"starts an engine \(ray.init\(\)\)"):
        ray.init(num_cpus=1)
    assert ray.is_initialized() == before


def test_other_subprocesses_run():
    r = subprocess.run([sys.executable, "-c", "print('ok')", "trainer.output_dir=/tmp/marl-llm-x"],
                       capture_output=True, text=True)
    assert r.stdout == "ok\n"
