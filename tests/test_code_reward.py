"""The code pass-rate reward and its sandbox: correctness, and containment of hostile solutions.

Every test runs with each sandbox backend available here: always the `subprocess` fallback, and `bwrap` when
bubblewrap is installed (CI installs it: `apt-get install -y bubblewrap`). A hostile solution must score 0 (or its
honest pass rate), leave nothing changed outside its temporary directory, leave no process behind, and the scorer
must go on working: each hostile call is followed by a correct solution in the same batch, which must score 1.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest

from trl_qrpo.rewards import CodePassRate, code_pass_rate, make_code_pass_rate
from trl_qrpo.sandbox import (
    ISOLATION_FEATURES,
    UID_BLOCK,
    CodeSandbox,
    CodeSandboxConfig,
    SandboxUnavailableError,
    extract_code,
    split_tests,
)

BACKENDS = ["subprocess"] + (["bwrap"] if shutil.which("bwrap") else [])
IS_ROOT = os.geteuid() == 0

# Small limits keep the file fast on 2 shared cores.
FAST = dict(cpu_time_limit=1, test_timeout=3.0, timeout=20.0, memory_mb=512, max_processes=32, num_workers=2)

ADD_TEST = """
def check(candidate):
    assert candidate(1, 2) == 3
    assert candidate(0, 0) == 0
    assert candidate(-1, 1) == 0
"""
GOOD = "Here you go:\n```python\ndef add(a, b):\n    return a + b\n```\n"


def block(code: str) -> str:
    return f"Solution:\n```python\n{code.strip()}\n```\nDone."


@pytest.fixture(scope="module", params=BACKENDS)
def reward(request) -> CodePassRate:
    return make_code_pass_rate(CodeSandboxConfig(backend=request.param, **FAST))


def score(reward, completions, test=ADD_TEST, entry_point="add", **columns):
    n = len(completions)
    return reward(
        prompts=["p"] * n, completions=completions, test=[test] * n, entry_point=[entry_point] * n, **columns
    )


def sandbox_processes() -> list[str]:
    """Processes running as one of the sandbox user ids (root runs), or in a sandbox work directory."""
    found = []
    base = CodeSandboxConfig().sandbox_uid
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            status = (entry / "status").read_text()
        except OSError:
            continue
        uid = int(status.split("Uid:")[1].split()[0])
        if base <= uid < base + 64 * UID_BLOCK:
            found.append(f"{entry.name}: {status.splitlines()[0]}")
    return found


def sandbox_dirs() -> set[str]:
    return {p.name for p in Path(tempfile.gettempdir()).glob("trl-qrpo-sandbox-*")}


@pytest.fixture
def no_leaks(monkeypatch):
    """Nothing left behind: no sandbox process, no sandbox work directory (in a temporary folder of this test's own,
    so that other programs' sandboxes on the machine do not count)."""
    private = tempfile.mkdtemp(prefix="trl-qrpo-test-tmp-")
    os.chmod(private, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", private)
    before = sandbox_dirs()
    yield
    deadline = time.monotonic() + 5
    while sandbox_processes() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert sandbox_processes() == []
    assert sandbox_dirs() - before == set()
    os.rmdir(private)  # empty


# ----------------------------------------------------------------------------------------------------------------
# Parsing: code blocks and tests (no sandbox)
# ----------------------------------------------------------------------------------------------------------------


def test_extract_code():
    assert extract_code("```python\nx = 1\n```") == "x = 1\n"
    assert extract_code("a\n```py\nx = 1\n```\nb\n```Python\ny = 2\n```", "last") == "y = 2\n"
    assert extract_code("```python\nx = 1\n```\n```python\ny = 2\n```", "all") == "x = 1\n\n\ny = 2\n"
    assert extract_code("```python\nx = 1\n```\n```python\ny = 2\n```") == "x = 1\n"
    assert extract_code("def f(): pass") is None
    assert extract_code("```python\ndef f(): pass\n") is None  # not closed (cut at max_new_tokens)
    assert extract_code("```js\nlet x = 1\n```") is None


def test_split_tests_rule():
    test = """
import math
LIMIT = 3

def check(candidate):
    '''docstring'''
    x = candidate(1)
    assert x == 2
    def helper(v):
        assert v > 0
        return v
    y = helper(candidate(2))
    assert y == 3
    for i in range(LIMIT):
        assert candidate(i) == i + 1
    if True:
        assert math.isfinite(candidate(0))
    assert True, "This prints if this assert fails (HumanEval's checks have such lines)"
    z = 0
"""
    units = split_tests(test)
    # two asserts, the loop, the if block; neither the helper's assert nor `assert True` is a test
    assert len(units) == 4
    namespace = {}
    exec(
        units[1], namespace
    )  # the second test keeps the set-up before it (x = ..., helper, y = ...) but not x's assert
    assert "LIMIT = 3" in units[1] and "import math" in units[1]
    assert "assert x == 2" not in units[1] and "y = helper(candidate(2))" in units[1]
    assert "for i in range(LIMIT)" not in units[1]
    calls = []
    namespace["check"](lambda v: calls.append(v) or v + 1)
    assert calls == [1, 2]
    assert split_tests("def check(candidate):\n    candidate(1)\n") == ["def check(candidate):\n    candidate(1)\n"]
    with pytest.raises(ValueError, match="check"):
        split_tests("def test(candidate):\n    assert candidate(1)\n")


def test_config_from_env():
    env = {
        "TRL_QRPO_SANDBOX_BACKEND": "subprocess",
        "TRL_QRPO_SANDBOX_REQUIRE_FULL_ISOLATION": "yes",
        "TRL_QRPO_SANDBOX_CPU_TIME_LIMIT": "2",
        "TRL_QRPO_SANDBOX_TEST_TIMEOUT": "1.5",
        "TRL_QRPO_SANDBOX_NUM_WORKERS": "",
    }
    config = CodeSandboxConfig.from_env(env)
    assert (config.backend, config.require_full_isolation, config.cpu_time_limit, config.test_timeout) == (
        "subprocess",
        True,
        2,
        1.5,
    )
    assert config.num_workers is None
    with pytest.raises(ValueError, match="TRL_QRPO_SANDBOX_MEMORY_MB"):
        CodeSandboxConfig.from_env({"TRL_QRPO_SANDBOX_MEMORY_MB": "lots"})
    with pytest.raises(ValueError, match="backend"):
        CodeSandboxConfig(backend="docker")
    for f in CodeSandboxConfig.__dataclass_fields__.values():
        assert f.metadata.get("help"), f"field {f.name} has no help text"


def test_column_errors_name_column_and_row(reward):
    with pytest.raises(ValueError, match="column 'test'"):
        reward(completions=[GOOD], entry_point=["add"])
    with pytest.raises(ValueError, match="Column 'test', row 1"):
        reward(completions=[GOOD, GOOD], test=[ADD_TEST, "assert True"], entry_point=["add", "add"])
    with pytest.raises(ValueError, match="Column 'entry_point', row 0"):
        reward(completions=[GOOD], test=[ADD_TEST], entry_point=[""])


# ----------------------------------------------------------------------------------------------------------------
# Correctness
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_pass_rates(reward, no_leaks):
    completions = [
        GOOD,
        block("def add(a, b):\n    return a + b if a >= 0 else 7"),  # fails the third test only
        "def add(a, b):\n    return a + b\n",  # no code block
        block("def add(a, b)\n    return a + b"),  # syntax error
        block("def add(a, b):\n    return a - b"),  # passes the second only
        [{"role": "assistant", "content": GOOD}],  # conversational
        block("import os\ndef add(a, b):\n    os._exit(0)"),  # exiting early does not pass
        block("import sys\ndef add(a, b):\n    sys.exit(0)"),
        block("def add(a, b):\n    return a + b\nraise RuntimeError('at import')"),
        block("def plus(a, b):\n    return a + b"),  # wrong name
    ]
    assert score(reward, completions) == [1.0, 2 / 3, 0.0, 0.0, 1 / 3, 1.0, 0.0, 0.0, 0.0, 0.0]


@pytest.mark.slow
def test_imports_column_and_entry_point_expression(reward, no_leaks):
    test = "def check(candidate):\n    assert candidate([4, 9]) == [2, 3]\n    assert candidate([]) == []\n"
    solution = block(
        "class Solution:\n    def roots(self, nums: List[int]) -> List[int]:\n        return [isqrt(n) for n in nums]"
    )
    header = "from typing import *\nfrom math import *"
    assert score(reward, [solution], test, "Solution().roots", imports=[header]) == [1.0]
    assert score(reward, [solution], test, "Solution().roots") == [0.0]  # NameError without the header


LEETCODE_HEADER = """import random
import functools
import collections
import string
import math
import datetime
from typing import *
from functools import *
from collections import *
from itertools import *
from heapq import *
from bisect import *
from string import *
from operator import *
from math import *

inf = float('inf')
"""


@pytest.mark.slow
def test_leetcode_import_header_and_the_standard_library(reward):
    # the import header of LeetCodeDataset and the modules solutions commonly use import inside the sandbox
    solution = block("""
import re, json, decimal, fractions, statistics, array, copy, itertools, heapq, bisect, string, dataclasses, enum
class Solution:
    def top(self, nums: List[int], k: int) -> List[int]:
        counts = Counter(nums)
        heap = []
        for value, count in counts.items():
            heappush(heap, (-count, value))
        return sorted(heappop(heap)[1] for _ in range(k))
""")
    test = "def check(candidate):\n    assert candidate([1, 1, 2, 3, 3, 3], 2) == [1, 3]\n    assert candidate([5], 1) == [5]\n"
    assert score(reward, [solution], test, "Solution().top", imports=[LEETCODE_HEADER]) == [1.0]


@pytest.mark.slow
def test_asserts_in_a_loop_count_once(reward):
    test = """
def check(candidate):
    assert candidate(0) == 0
    for x in [1, 2, 3]:
        assert candidate(x) == x * x
    assert candidate(10) == 100
"""
    # wrong for 3 only: the loop test fails, the two others pass
    solution = block("def sq(x):\n    return x * x if x != 3 else 0")
    assert score(reward, [solution], test, "sq") == [2 / 3]


@pytest.mark.slow
def test_code_pass_rate_reads_env(monkeypatch, no_leaks):
    monkeypatch.setenv("TRL_QRPO_SANDBOX_BACKEND", "subprocess")
    monkeypatch.setenv("TRL_QRPO_SANDBOX_NUM_WORKERS", "1")
    assert code_pass_rate(prompts=["p"], completions=[GOOD], test=[ADD_TEST], entry_point=["add"]) == [1.0]


@pytest.mark.slow
def test_configured_reward_is_named_and_picklable(reward):
    import pickle

    assert reward.__name__ == "code_pass_rate"  # the name `trl qrpo score` and trainers log it under
    copy = pickle.loads(pickle.dumps(reward))  # datasets.map(num_proc=...) and multiprocessing pickle rewards
    assert copy.config == reward.config
    assert score(copy, [GOOD]) == [1.0]


@pytest.mark.slow
def test_isolation_report_and_require_full(reward):
    sandbox = reward.sandbox
    assert set(sandbox.isolation) == set(ISOLATION_FEATURES)
    if IS_ROOT:
        # as root every layer is in force with both backends (the fallback builds a minimal root as bwrap does)
        assert sandbox.lacks == []
    config = CodeSandboxConfig(backend=sandbox.backend, require_full_isolation=True, **FAST)
    if sandbox.lacks:
        with pytest.raises(SandboxUnavailableError, match="require_full_isolation"):
            CodeSandbox(config)
    else:
        assert CodeSandbox(config).lacks == []


@pytest.mark.slow
def test_missing_bwrap_is_an_error(monkeypatch):
    monkeypatch.setattr(shutil, "which", lambda name: None)
    with pytest.raises(SandboxUnavailableError, match="apt-get install bubblewrap"):
        CodeSandbox(CodeSandboxConfig(backend="bwrap"))
    assert CodeSandbox(CodeSandboxConfig(backend="auto", num_workers=1)).backend == "subprocess"


# ----------------------------------------------------------------------------------------------------------------
# Containment: hostile solutions
# ----------------------------------------------------------------------------------------------------------------

ONE_TEST = "def check(candidate):\n    assert candidate() == 'escaped'\n"


def hostile(reward, code: str, test: str = ONE_TEST) -> float:
    """Score a hostile solution (entry point `f`), then check that the scorer still works: a correct one scores 1."""
    hostile_score, good_score = reward(
        completions=[block(code), GOOD], test=[test, ADD_TEST], entry_point=["f", "add"], prompts=["p", "p"]
    )
    assert good_score == 1.0
    return hostile_score


@pytest.mark.slow
def test_infinite_loop(reward, no_leaks):
    start = time.monotonic()
    assert hostile(reward, "def f():\n    while True:\n        pass") == 0.0
    assert hostile(reward, "import time\ndef f():\n    time.sleep(60)") == 0.0  # wall clock, no CPU
    assert time.monotonic() - start < 20


@pytest.mark.slow
def test_memory_bomb(reward, no_leaks):
    code = "def f():\n    x = bytearray(10 * 2**30)\n    return 'escaped'"
    assert hostile(reward, code) == 0.0
    code = "def f():\n    x = []\n    while True:\n        x.append(' ' * 2**20)"
    assert hostile(reward, code) == 0.0


@pytest.mark.slow
def test_fork_storm(reward, no_leaks):
    # a few hundred processes that each sleep: the process cap stops most of them; all are killed after the test
    code = """
import os, time
def f():
    started = 0
    for _ in range(300):
        try:
            pid = os.fork()
        except OSError:
            continue
        if pid == 0:
            time.sleep(30)
            os._exit(0)
        started += 1
    return 'escaped' if started == 300 else started
"""
    assert hostile(reward, code) == 0.0


@pytest.mark.slow
def test_network(reward, no_leaks):
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.bind(("127.0.0.1", 0))
    server.listen(8)
    server.settimeout(0.2)
    port = server.getsockname()[1]
    seen = []
    stop = threading.Event()

    def accept():
        while not stop.is_set():
            try:
                conn, _ = server.accept()
            except (TimeoutError, OSError):
                continue
            seen.append(conn.recv(100))
            conn.close()

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    code = f"""
import socket
def f():
    for host in ("127.0.0.1", "localhost", "::1"):
        try:
            s = socket.create_connection((host, {port}), timeout=1)
            s.sendall(b"hello from the sandbox")
            return 'escaped'
        except OSError:
            pass
    return 'contained'
"""
    try:
        assert hostile(reward, code) == 0.0
        # and a pass-through that does not need the network still works, so the listener proves something
        with socket.create_connection(("127.0.0.1", port), timeout=2) as s:
            s.sendall(b"from the test")
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join()
        server.close()
    assert seen == [b"from the test"]


@pytest.fixture
def sentinel_dir():
    """A world-writable directory with a world-writable file: only the sandbox keeps a solution from changing it."""
    path = Path(tempfile.mkdtemp(prefix="trl-qrpo-sentinel-"))
    path.chmod(0o777)
    sentinel = path / "sentinel.txt"
    sentinel.write_text("untouched\n")
    sentinel.chmod(0o666)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def snapshot(path: Path) -> dict:
    return {p.name: p.read_bytes() for p in sorted(path.iterdir())}


@pytest.mark.slow
def test_secret_from_environment(reward, no_leaks, monkeypatch, sentinel_dir):
    secret = "hf_" + os.urandom(8).hex()
    monkeypatch.setenv("HF_TOKEN", secret)
    monkeypatch.setenv("TRL_QRPO_TEST_SECRET", secret)
    before = snapshot(sentinel_dir)
    code = f"""
import os
def f():
    found = [v for v in os.environ.values() if v.startswith("hf_")]
    for pid in ("1", "2", str(os.getppid()), "{os.getpid()}", "self"):
        try:
            found += [e for e in open(f"/proc/{{pid}}/environ", "rb").read().split(b"\\0") if b"hf_" in e]
        except OSError:
            pass
    for target in ("{sentinel_dir}/leak.txt", "/tmp/trl-qrpo-leak.txt", "leak.txt"):
        try:
            open(target, "w").write(repr(found))
        except OSError:
            pass
    return 'escaped' if found else 'contained'
"""
    assert hostile(reward, code) == 0.0
    assert snapshot(sentinel_dir) == before
    assert not Path("/tmp/trl-qrpo-leak.txt").exists()


@pytest.mark.slow
def test_files_outside(reward, no_leaks, sentinel_dir):
    before = snapshot(sentinel_dir)
    home_marker = Path.home() / "trl-qrpo-sandbox-marker"
    code = f"""
import os, shutil
def f():
    done = []
    attempts = [
        lambda: open("{sentinel_dir}/sentinel.txt", "w").write("changed"),
        lambda: os.remove("{sentinel_dir}/sentinel.txt"),
        lambda: open("{sentinel_dir}/new.txt", "w").write("new"),
        lambda: shutil.rmtree("{sentinel_dir}"),
        lambda: open("{home_marker}", "w").write("x"),
        lambda: open("/tmp/trl-qrpo-outside.txt", "w").write("x"),
        lambda: open("/dev/shm/trl-qrpo-outside.txt", "w").write("x"),
        lambda: open("{Path(__file__).resolve()}", "a").write("# changed"),
    ]
    for attempt in attempts:
        try:
            attempt()
            done.append(True)
        except OSError:
            pass
    open("inside.txt", "w").write("the working directory is writable")
    return 'escaped' if done else open("inside.txt").read()
"""
    test = "def check(candidate):\n    assert candidate() == 'the working directory is writable'\n"
    assert hostile(reward, code, test) == 1.0  # honest: writing its own directory works, everything else failed
    assert snapshot(sentinel_dir) == before
    assert not home_marker.exists()
    assert not Path("/tmp/trl-qrpo-outside.txt").exists() and not Path("/dev/shm/trl-qrpo-outside.txt").exists()


@pytest.mark.slow
def test_reading_host_files_matches_the_report(reward, no_leaks):
    # a world-readable file of the host (this test file): hidden with bwrap and with the fallback's minimal root;
    # readable where the fallback cannot build one (no root, no user namespaces),
    # which reports that it does not hide host files
    code = f"def f():\n    open({str(Path(__file__).resolve())!r}).read()\n    return 'escaped'"
    readable = hostile(reward, code) == 1.0
    assert readable == (not reward.sandbox.isolation["host_files_hidden"])
    assert "host_files_hidden" in reward.sandbox.lacks or not readable


@pytest.mark.slow
def test_kill_the_parent(reward, no_leaks):
    # A process outside the sandbox (as the scorer is) that a solution tries to kill by its host PID.
    victim = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(120)"])
    try:
        for call in (
            "os.kill(os.getppid(), 9)",
            f"os.kill({os.getpid()}, 9)",  # the scorer, as the host numbers it
            f"os.kill({victim.pid}, 9)",
            "os.kill(1, 9)",
            "os.killpg(0, 9)",
            "os.kill(-1, 9)",
            "os.killpg(os.getpgid(os.getppid()), 9)",
        ):
            code = f"import os\ndef f():\n    {call}\n    return 'escaped'"
            # honest: 1 when the signal could not reach anything that matters (the solution goes on), 0 when it killed
            # its own test process; the correct solution after it scores 1 either way (checked in `hostile`)
            assert hostile(reward, code) in (0.0, 1.0), call
            assert victim.poll() is None, f"{call} killed a process outside the sandbox"
    finally:
        victim.kill()
        victim.wait()


@pytest.mark.slow
def test_os_system_and_subprocess(reward, no_leaks, sentinel_dir):
    before = snapshot(sentinel_dir)
    code = f"""
import os, subprocess
def f():
    os.system("echo changed > {sentinel_dir}/sentinel.txt; touch /tmp/trl-qrpo-system.txt; kill -9 -1")
    subprocess.run(["sh", "-c", "rm -f {sentinel_dir}/sentinel.txt; echo x > {sentinel_dir}/new.txt"])
    try:
        subprocess.run(["python3", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:1')"],
                       timeout=2)
    except Exception:
        pass
    escaped = open("{sentinel_dir}/sentinel.txt").read() != "untouched\\n" if os.path.exists("{sentinel_dir}") else False
    return 'escaped' if escaped or os.path.exists("/tmp/trl-qrpo-system.txt") else 'contained'
"""
    assert hostile(reward, code) == 0.0
    assert snapshot(sentinel_dir) == before
    assert not Path("/tmp/trl-qrpo-system.txt").exists()


@pytest.mark.slow
def test_many_solutions_in_parallel(reward, no_leaks):
    # results keep their order when solutions finish out of order
    slow = block("import time\ndef add(a, b):\n    time.sleep(0.3)\n    return a + b")
    wrong = block("def add(a, b):\n    return 0")
    assert score(reward, [slow, wrong, GOOD, wrong, slow, GOOD]) == [1.0, 2 / 3, 1.0, 2 / 3, 1.0, 1.0]


# ----------------------------------------------------------------------------------------------------------------
# Through the CLI
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_trl_qrpo_score_cli(tmp_path):
    rows = [
        {"prompt": "add two numbers", "completion": GOOD, "test": ADD_TEST, "entry_point": "add"},
        {
            "prompt": "add two numbers",
            "completion": block("def add(a, b):\n    return a - b"),
            "test": ADD_TEST,
            "entry_point": "add",
        },
        {"prompt": "add two numbers", "completion": "no code here", "test": ADD_TEST, "entry_point": "add"},
    ]
    data = tmp_path / "data.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    env = {**os.environ, "TRL_QRPO_SANDBOX_BACKEND": "subprocess", "TRL_QRPO_SANDBOX_NUM_WORKERS": "2"}
    out = tmp_path / "scored.jsonl"
    proc = subprocess.run(
        [sys.executable, "-m", "trl_qrpo", "score", "--dataset_name", str(data)]
        + ["--reward_funcs", "trl_qrpo.rewards.code_pass_rate", "--output_dir", str(tmp_path / "scored")]
        + ["--output_file", str(out)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    scored = [json.loads(line) for line in out.read_text().splitlines()]
    assert [r["reward"] for r in scored] == pytest.approx([1.0, 1 / 3, 0.0], abs=1e-6)
    assert "Code sandbox: backend 'subprocess'" in proc.stderr


# ----------------------------------------------------------------------------------------------------------------
# Not root: the fallback isolates with a user namespace of its own
# ----------------------------------------------------------------------------------------------------------------

UNPRIVILEGED_SCRIPT = """
import json, sys
sys.path.insert(0, sys.argv[1])
from pkg.sandbox import CodeSandbox, CodeSandboxConfig, Program, split_tests
sandbox = CodeSandbox(CodeSandboxConfig(backend=sys.argv[3], num_workers=1, show_progress=False, max_processes=16))
test = split_tests("def check(candidate):\\n    assert candidate() == 1\\n")
codes = [
    "def f():\\n    return 1",
    "import socket\\ndef f():\\n    socket.create_connection(('127.0.0.1', int(sys.argv[2])), timeout=1)\\n    return 1",
    "def f():\\n    open(sys.argv[1] + '/outside.txt', 'w').write('x')\\n    return 1",
    "def f():\\n    open('inside.txt', 'w').write('x')\\n    return 1",
]
codes = [c.replace("sys.argv[1]", repr(sys.argv[1])).replace("int(sys.argv[2])", sys.argv[2]) for c in codes]
results = [sandbox.run_program(Program(c, test, "f")).statuses for c in codes]
print(json.dumps({"lacks": sandbox.lacks, "results": results}))
"""


@pytest.mark.slow
@pytest.mark.parametrize("backend", BACKENDS)
def test_fallback_as_an_unprivileged_user(backend):
    """The scorer run by an ordinary user (here: nobody, through setpriv, with a system Python): no root, yet network,
    PID, mount and user namespaces, a read-only minimal root that hides the host's files, and the process cap."""
    python = shutil.which("python3", path="/usr/bin:/bin")
    if not IS_ROOT or shutil.which("setpriv") is None or python is None:
        pytest.skip("needs root (to become nobody), setpriv and a python3 in /usr/bin that nobody may run")
    import trl_qrpo.sandbox as module

    folder = Path(tempfile.mkdtemp(prefix="trl-qrpo-unprivileged-"))
    try:
        (folder / "pkg").mkdir()
        (folder / "pkg" / "__init__.py").write_text("")
        for name in ("sandbox.py", "_sandbox_harness.py"):
            shutil.copy(Path(module.__file__).with_name(name), folder / "pkg" / name)
        (folder / "run.py").write_text(UNPRIVILEGED_SCRIPT)
        for path in [folder, *folder.rglob("*")]:
            path.chmod(0o777 if path.is_dir() else 0o644)
        server = socket.socket()
        server.bind(("127.0.0.1", 0))
        server.listen(4)
        server.settimeout(0.1)
        port = server.getsockname()[1]
        command = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", python, str(folder / "run.py")]
        proc = subprocess.run(
            command + [str(folder), str(port), backend],
            capture_output=True,
            text=True,
            timeout=120,
            cwd=folder,
            env={"PATH": "/usr/bin:/bin"},
        )
        with pytest.raises(TimeoutError):
            server.accept()  # nobody connected
        server.close()
        assert proc.returncode == 0, proc.stderr[-3000:]
        report = json.loads(proc.stdout.strip().splitlines()[-1])
        if report["lacks"] != []:
            # user namespaces refused here (a kernel or container setting): the fallback must say what it lacks
            assert {"network", "read_only_fs", "pid_namespace", "process_limit"} <= set(report["lacks"]), report
            return
        assert report["results"] == [["passed"], ["failed"], ["failed"], ["passed"]]
        assert not (folder / "outside.txt").exists()
    finally:
        shutil.rmtree(folder, ignore_errors=True)
