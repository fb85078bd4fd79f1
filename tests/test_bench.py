"""`make bench` stays runnable: its cheapest section prints a table with a baseline ratio."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_bench_sandbox_section_prints_table():
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "sandbox"], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "x_vs_loop" in r.stdout and "run_many" in r.stdout


def test_bench_rejects_unknown_section():
    r = subprocess.run([sys.executable, "-m", "bench", "--only", "nope"], cwd=ROOT,
                       capture_output=True, text=True, timeout=120)
    assert r.returncode != 0 and "unknown section 'nope'" in r.stderr


@pytest.mark.slow
def test_bench_lora_section_sends_less_than_full_weights():
    r = subprocess.run([sys.executable, "-m", "bench", "--quick", "--only", "lora"], cwd=ROOT,
                       capture_output=True, text=True, timeout=1200)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = {l.split()[0]: l.split() for l in r.stdout.splitlines() if l.split()[:1] in (["full"], ["lora"])}
    assert float(rows["lora"][2]) < float(rows["full"][2]) / 10, r.stdout   # sync_MiB: adapter only
