"""`make bench` stays runnable: its cheapest section prints a table with a baseline ratio."""
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.engine  # `python -m bench`: its sections start the engines (setup.cfg)

ROOT = Path(__file__).resolve().parents[2]


def bench(*args: str, timeout: float) -> subprocess.CompletedProcess:
    """`python -m bench ARGS` from the repository root; its output captured."""
    return subprocess.run([sys.executable, "-m", "bench", *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def test_bench_sandbox_section_prints_table():
    r = bench("--quick", "--only", "sandbox", timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x_vs_loop" in r.stdout and "run_many" in r.stdout


def test_bench_rejects_unknown_section():
    r = bench("--only", "nope", timeout=120)
    assert r.returncode != 0 and "unknown section 'nope'" in r.stderr


@pytest.mark.slow
def test_bench_lora_section_sends_less_than_full_weights():
    r = bench("--quick", "--only", "lora", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if l.split()[:1] in (["full"], ["lora"])}
    assert float(rows["lora"][2]) < float(rows["full"][2]) / 10, r.stdout   # sync_MiB: adapter only


def _rows(stdout: str, header: str) -> list[list[str]]:
    """The data rows (split on 2+ spaces) of the table whose header line starts with `header`."""
    import re
    lines = stdout.splitlines()
    start = next(i for i, l in enumerate(lines) if l.startswith(header))
    out = []
    for l in lines[start + 2:]:
        if not l.strip() or l.startswith("##"):
            break
        out.append(re.split(r"\s{2,}", l.strip()))
    return out


@pytest.mark.slow
def test_bench_vs_trl_quick_runs_both_trainers_on_the_same_tasks():
    r = bench("--quick", "--only", "vs_trl", timeout=2400)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout, "run ")
    names = [row[0] for row in rows]
    assert any(n.startswith("TRL GRPOTrainer") and n.endswith("(best)") for n in names), r.stdout
    # TRL's vLLM generation (colocate) either ran or says why not (the exception's first line)
    vllm = [row for row in rows if row[0].startswith("TRL GRPOTrainer + vLLM colocate")]
    assert len(vllm) == 1, r.stdout
    failed = "cannot run here: " in vllm[0][0]
    if failed:
        assert vllm[0][0].split("cannot run here: ")[1].strip() and set(vllm[0][1:]) == {"-"}, vllm[0]
    # today's marl_llm row and the one at TRL's work (zero-advantage skip off: every sample trained)
    assert names[-2].startswith("marl_llm (") and names[-1].startswith("marl_llm, zero-advantage skip off"), r.stdout
    assert "other tasks" not in names[-1], r.stdout
    assert float(rows[-1][6]) == 16 and 1 <= float(rows[-2][6]) <= 16, rows[-2:]  # trained samples of 16
    for row in rows:  # generate, train, step seconds are real measurements; the ratio is positive
        if row is vllm[0] and failed:
            continue
        assert float(row[1]) > 0 and float(row[4]) > 0 and float(row[-1]) > 0, row


def test_bench_learner_quick_reports_share_of_gemm_ceiling():
    r = bench("--quick", "--only", "learner", timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout, "learner ")
    assert rows[0][0].startswith("default") and float(rows[0][-1]) == 1.0
    for row in rows:
        share = float(row[6])
        assert 0 < share < 1.5, row  # a model FLOP/s above the measured GEMM ceiling is a bug


@pytest.mark.slow
def test_bench_startup_quick_times_both_ways_of_starting():
    r = bench("--quick", "--only", "startup", timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = _rows(r.stdout, "start ")
    assert [row[0] for row in rows] == ["one engine at a time", "all at once"], r.stdout
    assert float(rows[0][1]) > 0 and float(rows[1][1]) > 0 and float(rows[0][2]) == 1.0, rows
