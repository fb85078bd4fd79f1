"""Process environment for the engines, set before Ray, vLLM or DeepSpeed are imported.

These are the defaults that make the stack behave on a small CPU machine (see docs/CPU.md);
anything already set in the environment wins. `actor_env()` is what every Ray actor
gets, so rollout workers and learner ranks run with the same settings as the driver.
"""
from __future__ import annotations

import contextlib
import logging
import os
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator

log = logging.getLogger(__name__)


def has_gpu() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:  # torch missing or broken: the engines will say so themselves
        return False


def _defaults() -> dict[str, str]:
    cache = Path(os.environ.get("MARL_LLM_CACHE") or Path.home() / ".cache" / "marl_llm")
    d = {
        "TOKENIZERS_PARALLELISM": "false",
        # keep Ray on loopback and without token auth for local clusters
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_DEDUP_LOGS": "0",
        "VLLM_CACHE_ROOT": str(cache / "vllm"),
        "TORCHINDUCTOR_CACHE_DIR": str(cache / "inductor"),
        "TORCH_EXTENSIONS_DIR": str(cache / "torch_extensions"),
        "VLLM_CONFIGURE_LOGGING": "0",
    }
    if not has_gpu():
        d.update({
            # the start value: an idle process holds one thread; a process that computes takes its
            # share of the cores for that phase (`compute_phase`)
            "OMP_NUM_THREADS": "1",
            "MKL_NUM_THREADS": "1",
            "DS_ACCELERATOR": "cpu",
            # vLLM on CPU otherwise claims ~90% of RAM for its KV cache
            "VLLM_CPU_KVCACHE_SPACE": "1",
            # engine in-process: starts in seconds and takes weight updates as plain tensors
            "VLLM_ENABLE_V1_MULTIPROCESSING": "0",
            # vllm-cpu 0.32 cannot load its own AOT compile artifacts ("'function' object has no
            # attribute 'finalize_loading'") and recompiles at every start; the classic
            # torch.compile cache loads (start-up times: docs/CPU.md)
            "VLLM_USE_AOT_COMPILE": "0",
        })
    return d


def apply_defaults() -> None:
    for k, v in _defaults().items():
        os.environ.setdefault(k, v)
    pin_cpus()


# ---- cluster.placement=split on CPU: rollout workers and learner ranks on disjoint cores ------------
CPUS_ENV = "MARL_LLM_CPUS"  # the cores an actor may run on, e.g. "0" or "2,3"


def pin_cpus() -> None:
    """Keep this process on the cores `MARL_LLM_CPUS` names (set for each side of a split placement)."""
    cpus = os.environ.get(CPUS_ENV)
    if cpus and hasattr(os, "sched_setaffinity"):
        os.sched_setaffinity(0, {int(c) for c in cpus.split(",")})


def split_env(side: str, rollout_share: float = 0.5) -> dict[str, str]:
    """Environment of one side ("rollout" | "learner") of a split placement on this machine's
    cores: the first `rollout_share` of the cores (at least one) generate, the others train, each
    side sharing its own cores among its processes (its own `compute_phase` directory). A
    disaggregated cluster, scaled down to one machine."""
    cores = sorted(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else list(range(os.cpu_count() or 1))
    if len(cores) < 2:
        raise RuntimeError(f"cluster.placement=split needs at least 2 cores for disjoint rollout and learner "
                           f"cores; this process may run on {len(cores)}: use cluster.placement=colocated")
    n = min(len(cores) - 1, max(1, round(len(cores) * rollout_share)))
    mine = cores[:n] if side == "rollout" else cores[n:]
    env = {CPUS_ENV: ",".join(map(str, mine)), CORES_DIR_ENV: str(_cores_dir() / side)}
    if side == "rollout":
        env["VLLM_CPU_OMP_THREADS_BIND"] = ",".join(map(str, mine))  # vLLM binds its threads there
    return env


def node_label() -> str:
    """This process's Ray node as messages name it: `<ip>/<node id prefix>` (inside an actor)."""
    try:
        import ray
        return f"{ray.util.get_node_ip_address()}/{ray.get_runtime_context().get_node_id()[:8]}"
    except Exception:  # noqa: BLE001 — outside Ray (a unit test's stand-in): no node to name
        return "?"


# ---- fault injection: the hang tests stop an actor at a chosen point ----------------------------
FAULT_ENV = "MARL_LLM_FAULT_STOP"
_fault_hits: dict[str, int] = {}


def fault_point(point: str, rank: int = 0) -> None:
    """Where `$MARL_LLM_FAULT_STOP` is `<point>[@<rank>]:<n>`, the n-th call of `point` in this
    process (of rank `rank`) stops it with SIGSTOP: a hung actor, for the deadline tests
    (tests/marl_llm/test_faults.py). Unset (always, outside those tests), it costs a dict lookup."""
    spec = os.environ.get(FAULT_ENV)
    if not spec:
        return
    target, _, nth = spec.rpartition(":")
    name, _, want_rank = target.partition("@")
    if name != point or int(want_rank or 0) != rank:
        return
    _fault_hits[point] = _fault_hits.get(point, 0) + 1
    if _fault_hits[point] == int(nth):
        import signal

        log.warning("fault injection (%s=%s): stopping this process (pid %d)", FAULT_ENV, spec, os.getpid())
        os.kill(os.getpid(), signal.SIGSTOP)


# ---- quiet by default: the engines' own output goes to the run's engines.log ----------------------
ENGINE_LOG_ENV = "MARL_LLM_ENGINE_LOG"


def quiet_driver() -> None:
    """The driver's own library chatter (progress bars of model conversion, font caches) off the
    terminal; the run's log lines and its progress bar stay. `--verbose` skips this."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    # other libraries' tqdm bars (the one-time GGUF conversion); the run's own bar passes disable= itself
    os.environ.setdefault("TQDM_DISABLE", "1")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    for name in ("matplotlib", "ray", "datasets", "filelock"):
        logging.getLogger(name).setLevel(logging.WARNING)


def redirect_engine_output() -> None:
    """Ray's worker-process setup hook: the actor's stdout and stderr (vLLM, DeepSpeed, torch
    notes) append to `$MARL_LLM_ENGINE_LOG` instead of reaching the driver's terminal. A node
    that cannot open the file keeps Ray's own log files and says so there."""
    path = os.environ.get(ENGINE_LOG_ENV)
    if not path:
        return
    try:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    except OSError as e:
        print(f"marl_llm: engine output stays in Ray's logs: cannot open {path}: {e}", flush=True)
        return
    import sys

    sys.stdout.flush()
    sys.stderr.flush()
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def actor_env() -> dict[str, str]:
    """Environment variables every Ray actor of a run starts with."""
    apply_defaults()
    keys = set(_defaults()) | {"HF_HUB_OFFLINE", "HF_HOME", "MARL_LLM_CACHE", "RAY_AUTH_MODE",
                               "VLLM_CPU_OMP_THREADS_BIND", "PYTHONPATH", CORES_DIR_ENV, ENGINE_LOG_ENV,
                               FAULT_ENV}
    return {k: os.environ[k] for k in keys if k in os.environ}


# ---- CPU cores: the active phase gets the machine ---------------------------------------------
# On CPU every engine process (rollout worker, learner rank) starts with one thread. When it
# computes (a generate call, a train step) it registers in a per-machine directory and takes
# `cores // active` threads, where `active` counts the processes computing at that moment: a
# phase that runs alone (GRPO's generate, then its train step) gets every core; MAGRPO's agents
# generating or training at the same time, or the ranks of one learner group, split them and
# never oversubscribe (an OpenMP team on a core that another process holds collapses).
# A long phase re-takes its share while it runs (`rebalance`, between engine steps and
# micro-batches): when MLPO's leader engine finishes its evaluation batch first, the team's
# engine, still generating, picks up the freed core instead of leaving it idle.
CORES_DIR_ENV = "MARL_LLM_CORES_DIR"
# seconds between two share checks of a running phase; 0 turns rebalancing off (the share is
# taken once, when the phase starts)
REBALANCE_ENV = "MARL_LLM_REBALANCE_S"
REBALANCE_S = 0.5
# concurrent dispatches from the driver arrive within milliseconds of each other: wait this
# long after registering before counting who else is active
SETTLE_S = 0.05


def cpu_cores() -> int:
    """Cores this process may run on (its affinity mask, which containers and Ray respect)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def set_threads(n: int) -> None:
    """torch's intra-op (OpenMP) threads of this process. Calls the C binding directly: vLLM's
    CPU worker replaces `torch.set_num_threads` with a no-op in the process it runs in."""
    import torch
    torch._C.set_num_threads(max(1, int(n)))


def _cores_dir() -> Path:
    """One registry per machine and user (every run on the machine shares its cores), in
    /dev/shm where it exists; `MARL_LLM_CORES_DIR` overrides."""
    d = os.environ.get(CORES_DIR_ENV)
    if not d:
        base = Path("/dev/shm") if Path("/dev/shm").is_dir() else Path(tempfile.gettempdir())
        d = str(base / f"marl_llm_cores_{os.getuid()}")
    Path(d).mkdir(parents=True, exist_ok=True)
    return Path(d)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def active_phases() -> int:
    """Engine phases computing right now on this machine (markers of dead processes are removed)."""
    n = 0
    for f in _cores_dir().iterdir():
        try:
            pid = int(f.name.split(".")[0])
        except ValueError:
            continue
        if _alive(pid):
            n += 1
        else:
            f.unlink(missing_ok=True)
    return n


def phase_threads(fixed: int = 0) -> int:
    """Threads for a phase starting now: `fixed` if set (> 0), else this process's share."""
    if fixed > 0:
        return fixed
    return max(1, cpu_cores() // max(1, active_phases()))


class _Phase(threading.local):
    """The compute phase this thread is in: its pinned thread count (0: a share), current
    threads and when the share was last checked."""
    fixed: int = 0
    threads: int = 0
    checked: float = 0.0


_phase = _Phase()


@contextlib.contextmanager
def compute_phase(fixed: int = 0, settle_s: float = SETTLE_S) -> Iterator[int]:
    """Register this process as computing, take its share of the cores, drop back to one thread
    on exit. `fixed` > 0 pins the thread count (config `rollout.threads` / `learner.threads`).
    Long phases call `rebalance` as they go. A no-op on GPUs (threads do not matter there)."""
    if has_gpu():
        yield 0
        return
    marker = _cores_dir() / f"{os.getpid()}.{threading.get_ident()}"
    marker.touch()
    try:
        if not fixed:
            time.sleep(settle_s)
        n = phase_threads(fixed)
        set_threads(n)
        _phase.fixed, _phase.threads, _phase.checked = fixed, n, time.monotonic()
        yield n
    finally:
        _phase.threads = 0
        marker.unlink(missing_ok=True)
        set_threads(1)


def rebalance() -> int:
    """Inside a compute phase: re-take this process's share of the cores if the number of phases
    computing has changed (another engine finished or started), checked at most once every
    `MARL_LLM_REBALANCE_S` seconds. Call it between steps of a long phase (vLLM engine steps,
    learner micro-batches); it must run on the thread that computes (OpenMP's thread count is
    per thread). Returns the phase's threads now (0 outside a phase or on GPUs)."""
    if not _phase.threads or _phase.fixed:
        return _phase.threads
    every = float(os.environ.get(REBALANCE_ENV, REBALANCE_S))
    now = time.monotonic()
    if every <= 0 or now - _phase.checked < every:
        return _phase.threads
    _phase.checked = now
    n = phase_threads()
    if n != _phase.threads:
        set_threads(n)
        _phase.threads = n
    return n
