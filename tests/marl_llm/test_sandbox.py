"""Hostile programs against marl_llm.sandbox: each must be contained.

Protections the OS does not permit here (no namespaces: network / filesystem hiding) are
skipped with the reason; everything else must hold in every mode.  Processes a run leaves
behind are detected by a unique token in their command line (scan of /proc).
"""
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from pathlib import Path

import pytest

from marl_llm.sandbox import SandboxResult, capabilities, run_code, run_many

pytestmark = pytest.mark.timeout(120)

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def caps():
    return capabilities()


def _token() -> str:
    return "sbxtok" + uuid.uuid4().hex[:12]


def _alive_with(token: str) -> list[int]:
    """Live (non-zombie) processes whose command line contains `token`."""
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/cmdline", "rb") as f:
                cmd = f.read()
            with open(f"/proc/{name}/stat", "rb") as f:
                state = f.read().rsplit(b")", 1)[1].split()[0]
        except OSError:
            continue
        if token.encode() in cmd and state not in (b"Z", b"X"):
            found.append(int(name))
    return found


def _spawn_snippet(token: str, body: str) -> str:
    """Source that starts `body` as a separate python process tagged with `token`."""
    return (f"import subprocess, sys\n"
            f"subprocess.Popen([sys.executable, '-c', {body!r}, {token!r}])\n")


# ------------------------------------------------------------------------------ basics
def test_ok_and_result_type():
    r = run_code("print('hello')")
    assert isinstance(r, SandboxResult)
    assert (r.status, r.returncode, r.stdout, r.stderr, r.truncated) == ("ok", 0, "hello\n", "",
                                                                         False)
    assert 0 < r.duration_s < 5


def test_exit_codes():
    assert run_code("import sys; sys.exit(3)").returncode == 3
    assert run_code("import sys; sys.exit(3)").status == "error"
    assert run_code("exit(0)").status == "ok"          # site's exit() exists despite -S
    r = run_code("import os; os._exit(7)")
    assert (r.status, r.returncode) == ("error", 7)


def test_exception_traceback():
    r = run_code("def f():\n    raise ValueError('boom')\nf()\n")
    assert r.status == "error" and r.returncode == 1
    assert "Traceback (most recent call last)" in r.stderr
    assert "ValueError: boom" in r.stderr and 'line 2, in f' in r.stderr
    assert "_sandbox" not in r.stderr and "_helper" not in r.stderr    # no launcher frames
    r = run_code("def f(:\n")
    assert r.status == "error" and "SyntaxError" in r.stderr


def test_stdin():
    r = run_code("a = int(input()); b = int(input()); print(a + b)", stdin="2\n40\n")
    assert (r.status, r.stdout) == ("ok", "42\n")
    assert run_code("import sys; print(repr(sys.stdin.read()))").stdout == "''\n"


def test_stdlib_only():
    assert run_code("import json, re, itertools, math, collections").status == "ok"
    r = run_code("import numpy")   # installed for the caller, not visible to the program
    assert r.status == "error" and "ModuleNotFoundError" in r.stderr


# ---------------------------------------------------------------------- resource bombs
def test_infinite_loop_times_out_and_tree_dies():
    tok = _token()
    code = _spawn_snippet(tok, "while True: pass") + "while True: pass\n"
    t = time.monotonic()
    r = run_code(code, timeout_s=1.0)
    assert time.monotonic() - t < 4.0
    assert (r.status, r.returncode) == ("timeout", None)
    assert _alive_with(tok) == []


def test_memory_bomb_is_oom():
    r = run_code("x = bytearray(2 * 1024**3)", memory_mb=256)
    assert r.status == "oom", r
    r = run_code("l = []\nwhile True:\n    l.append(bytearray(10**7))", memory_mb=200,
                 timeout_s=10)
    assert r.status == "oom", r


def test_fork_flood_contained():
    tok = _token()
    flood = ("import os\n"
             "while True:\n"
             "    try:\n"
             "        os.fork()\n"
             "    except OSError:\n"
             "        pass\n")
    code = f"import os, sys\nos.execv(sys.executable, [sys.executable, '-c', {flood!r}, {tok!r}])"
    t = time.monotonic()
    r = run_code(code, timeout_s=1.5, max_processes=8)
    assert time.monotonic() - t < 6.0
    assert r.status in ("timeout", "killed", "error"), r
    assert _alive_with(tok) == []


def test_process_limit(caps):
    r = run_code(textwrap.dedent("""
        import os, time
        n = 0
        for _ in range(50):
            try:
                if os.fork() == 0:
                    time.sleep(2)
                    os._exit(0)
                n += 1
            except OSError:
                break
        print(n)
        """), max_processes=6, timeout_s=5)
    assert r.status == "ok", r
    # exact with a dedicated uid / user namespace; approximate when sharing the caller's uid
    assert int(r.stdout) < (6 if caps["uid_drop"] or caps["namespaces"] else 50)


def test_output_flood_is_truncated_and_killed():
    t = time.monotonic()
    r = run_code("import sys\nwhile True:\n    sys.stdout.write('x' * 65536)",
                 max_output_bytes=1000, timeout_s=10)
    assert time.monotonic() - t < 5.0                # killed at the hard cap, not the timeout
    assert r.status == "killed" and r.truncated
    assert r.stdout == "x" * 1000
    r = run_code("print('y' * 5000)", max_output_bytes=1000)   # over the cap, then exits
    assert (r.status, r.truncated, len(r.stdout)) == ("ok", True, 1000)


def test_big_file_write_limited():
    r = run_code("open('big', 'wb').write(b'0' * (200 * 1024**2))", memory_mb=1024)
    assert r.status in ("error", "oom", "killed"), r


# ------------------------------------------------------------------------- isolation
def test_env_secrets_hidden(monkeypatch):
    monkeypatch.setenv("SECRET", "hunter2-" + uuid.uuid4().hex)
    secret = os.environ["SECRET"]
    r = run_code(textwrap.dedent("""
        import os
        print(sorted(os.environ))
        for p in ("/proc/self/environ", "/proc/%d/environ" % os.getppid()):
            try:
                print(open(p, "rb").read())
            except OSError as e:
                print("denied", p)
        """))
    assert r.status == "ok", r
    assert secret not in r.stdout and "SECRET" not in r.stdout
    assert "HOME" in r.stdout


def test_network_blocked(caps):
    if not caps["network_isolated"]:
        pytest.skip("no network namespace here: %s" % caps["ns_error"])
    srv = socket.socket()
    srv.bind(("127.0.0.1", 0))
    srv.listen(1)
    port = srv.getsockname()[1]
    try:
        r = run_code(f"import socket\nsocket.create_connection(('127.0.0.1', {port}), timeout=3)"
                     "\nprint('CONNECTED')")
        assert r.status == "error" and "CONNECTED" not in r.stdout, r
        r = run_code("import socket\nprint(socket.getaddrinfo('example.com', 80))")
        assert r.status == "error" and "gaierror" in r.stderr, r
    finally:
        srv.close()


def test_writes_outside_workdir(caps):
    if not (caps["filesystem_isolated"] or caps["uid_drop"]):
        pytest.skip("no mount namespace and no uid to drop to: only the caller's own file "
                    "permissions apply")
    marker = f"/tmp/sbx_marker_{uuid.uuid4().hex}"
    proj_marker = REPO / f"sbx_marker_{uuid.uuid4().hex}"
    try:
        r = run_code(f"open({str(proj_marker)!r}, 'w').write('x')")
        assert r.status == "error" and not proj_marker.exists(), r
        r = run_code(f"open({marker!r}, 'w').write('x')\nopen('local.txt', 'w').write('ok')")
        if caps["filesystem_isolated"]:
            assert r.status == "ok" and not os.path.exists(marker)   # a private /tmp
        elif r.status == "ok":
            pytest.skip("no mount namespace: world-writable /tmp is shared with the host")
    finally:
        for p in (marker, str(proj_marker)):
            if os.path.exists(p):
                os.unlink(p)


def test_private_workdir_is_fresh():
    assert run_code("open('f.txt', 'w').write('1')").status == "ok"
    r = run_code("import os; print(sorted(os.listdir('.')))")
    assert "f.txt" not in r.stdout


def test_project_and_home_hidden(caps):
    home_rc = os.path.join(os.path.expanduser("~"), ".bashrc")
    code = textwrap.dedent(f"""
        for p in ({str(REPO / 'setup.cfg')!r}, {home_rc!r}):
            try:
                open(p).read()
                print("READ", p)
            except OSError as e:
                print("blocked", p, type(e).__name__)
        """)
    r = run_code(code)
    assert r.status == "ok", r
    if not caps["filesystem_isolated"]:
        pytest.skip("no mount namespace: only file permissions protect host files")
    assert "READ" not in r.stdout, r.stdout


def test_runs_unprivileged(caps):
    r = run_code("import os; print(os.getuid(), os.geteuid())\n"
                 "print(open('/proc/self/status').read())")
    lines = r.stdout.splitlines()
    uid, euid = map(int, lines[0].split())
    status = dict(line.split(":", 1) for line in lines[1:] if ":" in line)
    if os.geteuid() == 0 and caps["uid_drop"]:
        assert uid != 0 and euid != 0
    assert int(status["CapEff"], 16) == 0 and int(status["CapPrm"], 16) == 0
    assert status["NoNewPrivs"].strip() == "1"


def test_kill_parent_does_not_hurt_caller():
    tok = _token()
    code = _spawn_snippet(tok, "import time; time.sleep(60)") + \
        "import os, signal\nos.kill(os.getppid(), signal.SIGKILL)\nimport time\ntime.sleep(1)\n"
    r = run_code(code, timeout_s=5)
    assert r.status in ("ok", "error", "killed")
    assert _alive_with(tok) == []
    assert run_code("print(1)").stdout == "1\n"     # the launcher still works


def test_orphaned_grandchild_is_killed():
    tok = _token()
    code = textwrap.dedent(f"""
        import os, sys
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                os.execv(sys.executable, [sys.executable, "-c", "import time; time.sleep(60)",
                                          {tok!r}])
            os._exit(0)
        os.wait()
        import time
        time.sleep(0.3)
        print("parent done")
        """)
    r = run_code(code, timeout_s=5)
    assert (r.status, r.stdout) == ("ok", "parent done\n"), r
    assert _alive_with(tok) == []


# -------------------------------------------------------------------------- run_many
def test_run_many_parallel_no_leaks():
    tok = _token()
    codes = [_spawn_snippet(tok, "import time; time.sleep(60)") + f"print({i} * {i})"
             for i in range(16)]
    t = time.monotonic()
    results = run_many(codes, timeout_s=10)
    elapsed = time.monotonic() - t
    assert [r.stdout for r in results] == [f"{i * i}\n" for i in range(16)]
    assert all(r.status == "ok" for r in results)
    assert elapsed < 30
    assert _alive_with(tok) == []


def test_run_many_mixed_and_empty():
    assert run_many([]) == []
    rs = run_many(["print(1)", "while True: pass", "raise SystemExit(2)", "print(input())"],
                  max_workers=4, timeout_s=1.0, stdin="hi")
    assert [r.status for r in rs] == ["ok", "timeout", "error", "ok"]
    assert rs[3].stdout == "hi\n"


# ------------------------------------------------------------------ modes and the CLI
def _run_script(script: str, **env) -> dict:
    e = {k: v for k, v in os.environ.items()}
    e.update(env)
    p = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                       timeout=90, env=e, cwd=str(REPO))
    assert p.returncode == 0, p.stderr
    return {"out": json.loads(p.stdout.strip().splitlines()[-1]), "log": p.stderr}


@pytest.mark.parametrize("env", [{"MARL_SANDBOX_NAMESPACES": "0"}, {"MARL_SANDBOX_EXEC": "1"}],
                         ids=["no-namespaces", "exec-per-run"])
def test_other_modes(env):
    tok = _token()
    script = textwrap.dedent(f"""
        import json, os
        os.environ["SECRET"] = "s3cr3t"
        from marl_llm.sandbox import run_code
        orphan = ("import os, sys\\n"
                  "if os.fork() == 0:\\n"
                  "    os.setsid()\\n"
                  "    os.execv(sys.executable,\\n"
                  "             [sys.executable, '-c', 'import time; time.sleep(60)', {tok!r}])\\n"
                  "print('done')\\n")
        out = {{
            "ok": run_code("print(6 * 7)").stdout,
            "err": run_code("raise KeyError(1)").status,
            "loop": run_code("while True: pass", timeout_s=1).status,
            "oom": run_code("x = bytearray(2 * 1024**3)", memory_mb=256).status,
            "env": run_code("import os; print(os.environ.get('SECRET'))").stdout,
            "orphan": run_code(orphan).stdout,
        }}
        print(json.dumps(out))
        """)
    res = _run_script(script, **env)
    assert res["out"] == {"ok": "42\n", "err": "error", "loop": "timeout", "oom": "oom",
                          "env": "None\n", "orphan": "done\n"}
    assert _alive_with(tok) == []
    if env.get("MARL_SANDBOX_NAMESPACES") == "0":
        assert "MISSING protections" in res["log"]      # the degraded mode is logged


def test_cli_prints_one_json_line(tmp_path):
    f = tmp_path / "prog.py"
    f.write_text("import sys\nprint('out')\nprint('err', file=sys.stderr)\nsys.exit(2)\n")
    p = subprocess.run([sys.executable, "-m", "marl_llm.sandbox", str(f), "--timeout", "3",
                        "--memory-mb", "256"], capture_output=True, text=True, timeout=60,
                       cwd=str(REPO))
    assert p.returncode == 0, p.stderr
    lines = p.stdout.strip().splitlines()
    assert len(lines) == 1
    d = json.loads(lines[0])
    assert {"status", "returncode", "stdout", "stderr", "duration_s"} <= set(d)
    assert (d["status"], d["returncode"], d["stdout"], d["stderr"]) == ("error", 2, "out\n",
                                                                        "err\n")


def test_invalid_arguments():
    with pytest.raises(TypeError):
        run_code(b"print(1)")
    with pytest.raises(ValueError):
        run_code("print(1)", timeout_s=0)
