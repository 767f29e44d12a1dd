"""The code sandbox under attack, continued: nothing a solution does stops the scorer, scorers do not share limits,
and the hardening layers (write quota, no user namespaces, no host unix sockets, no host paths in /proc) hold.

Also the parts of the two-process design an honest solution relies on: LeetCode's helper classes cross field by
field, exceptions the test expects arrive as themselves, exits and crashes fail only their own calls.
"""

from __future__ import annotations

import os
import shutil
import socket
import tempfile
import threading
import time
from pathlib import Path

import pytest

from trl_qrpo.rewards import make_code_pass_rate
from trl_qrpo.sandbox import CodeSandbox, CodeSandboxConfig, Program, remove_tree, split_tests

BACKENDS = ["subprocess"] + (["bwrap"] if shutil.which("bwrap") else [])
IS_ROOT = os.geteuid() == 0
FAST = {
    "cpu_time_limit": 1,
    "test_timeout": 4.0,
    "timeout": 30.0,
    "memory_mb": 512,
    "max_processes": 32,
    "num_workers": 2,
}

ADD_TEST = "def check(candidate):\n    assert candidate(1, 2) == 3\n    assert candidate(0, 0) == 0\n"
ONE_TEST = "def check(candidate):\n    assert candidate() == 'done'\n"
GOOD = "```python\ndef add(a, b):\n    return a + b\n```"
WRONG = "```python\ndef add(a, b):\n    return a * b\n```"  # passes the second test only


def block(code: str) -> str:
    return f"```python\n{code.strip()}\n```"


@pytest.fixture(scope="module", params=BACKENDS)
def reward(request):
    return make_code_pass_rate(CodeSandboxConfig(backend=request.param, show_progress=False, max_disk_mb=8, **FAST))


@pytest.fixture
def private_tmp(monkeypatch):
    """The scorer's temporary folder, private to this test: whatever is left in it afterwards is a leak."""
    path = tempfile.mkdtemp(prefix="trl-qrpo-test-tmp-")
    os.chmod(path, 0o755)
    monkeypatch.setattr(tempfile, "tempdir", path)
    yield Path(path)
    left = sorted(p.name for p in Path(path).iterdir())
    shutil.rmtree(path, ignore_errors=True)
    assert left == [], f"left behind: {left}"


DEEP_TREE = """
import os
def f():
    path = "."
    for _ in range(1200):                                 # 1200 levels (the former cleanup's RecursionError)
        path += "/d"
        os.mkdir(path)
    fd = os.open(".", os.O_RDONLY)
    for _ in range(3000):                                 # deeper still, past PATH_MAX, through descriptors
        try:
            os.mkdir("deeper", dir_fd=fd)
        except FileExistsError:
            pass
        new = os.open("deeper", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.makedirs("ro/inner", exist_ok=True)
    open("ro/inner/file", "w").write("x")
    os.chmod("ro/inner/file", 0o400)
    os.chmod("ro/inner", 0o500)
    os.chmod("ro", 0o500)
    for name in (b"\\xff\\xfe odd", b"new\\nline", b"-rf", b" "):
        open(name, "wb").write(b"x")
    return "done"
"""


@pytest.mark.slow
def test_cleanup_cannot_be_stopped(reward, private_tmp):
    # honest: the solution may write all this in its own directory (it passes); the scorer cleans up without raising
    assert reward(completions=[block(DEEP_TREE), GOOD], test=[ONE_TEST, ADD_TEST], entry_point=["f", "add"]) == [
        1.0,
        1.0,
    ]


@pytest.mark.slow
def test_remove_tree_on_the_host(tmp_path):
    sentinel = tmp_path / "outside"
    sentinel.mkdir()
    (sentinel / "keep.txt").write_text("keep")
    root = tmp_path / "work"
    root.mkdir()
    path = str(root)
    for _ in range(1200):
        path += "/d"
        os.mkdir(path)
    fd = os.open(root, os.O_RDONLY)
    for _ in range(1500):  # a path longer than PATH_MAX
        os.mkdir("level-of-a-deep-tree", dir_fd=fd)
        new = os.open("level-of-a-deep-tree", os.O_RDONLY, dir_fd=fd)
        os.close(fd)
        fd = new
    os.close(fd)
    (root / "ro").mkdir()
    (root / "ro" / "file").write_text("x")
    os.chmod(root / "ro" / "file", 0o400)
    os.chmod(root / "ro", 0o500)
    for name in (b"\xff\xfe odd", b"new\nline", b"-rf"):
        with open(os.path.join(os.fsencode(root), name), "wb") as f:
            f.write(b"x")
    os.symlink(sentinel, root / "link-out")
    os.chmod(root, 0o500)
    assert remove_tree(str(root)) is True
    assert not root.exists()
    assert (sentinel / "keep.txt").read_text() == "keep"  # a symbolic link is removed, not followed
    assert remove_tree(str(tmp_path / "never-existed")) is True


@pytest.mark.slow
def test_write_quota(reward, private_tmp):
    # each file is under the per-file limit (16 MiB); together they pass the 8 MiB tmpfs
    code = """
import os
def f(n):
    written = 0
    try:
        for i in range(n):
            with open(f"blob{i}", "wb") as out:
                out.write(os.urandom(2**20))
            written += 1
    except OSError:
        pass
    return written
"""
    test = "def check(candidate):\n    assert candidate(3) == 3\n    assert candidate(40) == 40\n"
    assert reward(completions=[block(code)], test=[test], entry_point=["f"]) == [0.5]
    assert reward.sandbox.isolation["write_quota"] == (reward.sandbox.backend == "bwrap" or IS_ROOT)


@pytest.mark.slow
def test_no_user_namespaces_no_host_unix_sockets(reward, private_tmp):
    folder = Path(tempfile.mkdtemp(prefix="trl-qrpo-socket-", dir="/tmp"))
    folder.chmod(0o777)
    path = folder / "host.sock"
    server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    server.bind(str(path))
    path.chmod(0o777)
    server.listen(4)
    server.settimeout(0.2)
    code = f"""
import ctypes, socket, subprocess
def f():
    reached = []
    try:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.connect({str(path)!r})
        reached.append("socket")
    except OSError:
        pass
    if ctypes.CDLL(None, use_errno=True).unshare(0x10000000) == 0:
        reached.append("userns")
    try:
        if subprocess.run(["unshare", "-U", "true"], capture_output=True, timeout=5).returncode == 0:
            reached.append("unshare -U")
    except Exception:
        pass
    a, b = socket.socketpair()  # allowed: it reaches nothing
    a.sendall(b"x")
    return "done" if not reached and b.recv(1) == b"x" else repr(reached)
"""
    try:
        assert reward(completions=[block(code)], test=[ONE_TEST], entry_point=["f"]) == [1.0]
        with pytest.raises(TimeoutError):
            server.accept()
    finally:
        server.close()
        shutil.rmtree(folder, ignore_errors=True)
    assert reward.sandbox.isolation["no_user_namespaces"] and reward.sandbox.isolation["no_host_sockets"]


@pytest.mark.slow
def test_no_host_path_of_the_scorer_in_proc(reward, private_tmp):
    here = str(Path(__file__).resolve().parents[1])
    code = f"""
import os
def f():
    seen = []
    for pid in os.listdir("/proc"):
        if pid.isdigit():
            try:
                seen.append(open(f"/proc/{{pid}}/cmdline", "rb").read().decode(errors="replace"))
            except OSError:
                pass
    leaks = [c for c in seen if {here!r} in c or "trl-qrpo-sandbox-" in c or "{tempfile.gettempdir()}" in c]
    return "done" if seen and not leaks else repr(leaks or "no process seen")
"""
    assert reward(completions=[block(code)], test=[ONE_TEST], entry_point=["f"]) == [1.0]


STORM = """
import os, time
def f():
    started = 0
    while True:
        try:
            pid = os.fork()
        except OSError:
            break
        if pid == 0:
            time.sleep(8)
            os._exit(0)
        started += 1
    time.sleep(8)
    return started
"""
FORKS = """
import os
def f():
    children = []
    for _ in range(8):
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        children.append(pid)
    return sum(os.waitstatus_to_exitcode(os.waitpid(p, 0)[1]) for p in children)
"""


@pytest.mark.slow
@pytest.mark.skipif(not IS_ROOT, reason="user ids of their own per scorer need a root scorer (else: the user's own)")
@pytest.mark.parametrize("backend", BACKENDS)
def test_two_scorers_do_not_share_limits(backend, private_tmp):
    config = dict(FAST, backend=backend, show_progress=False, max_processes=16, num_workers=1, test_timeout=12.0)
    stormy = CodeSandbox(CodeSandboxConfig(**config))
    honest = CodeSandbox(CodeSandboxConfig(**config))
    assert stormy.uid_base != honest.uid_base
    storm_test = split_tests("def check(candidate):\n    assert candidate() == -1\n")
    forks_test = split_tests("def check(candidate):\n    assert candidate() == 56\n")
    storm = threading.Thread(target=stormy.run, args=([Program(STORM, storm_test, "f")],))
    storm.start()
    try:
        time.sleep(2.0)  # the storm holds its 16 processes for 8 s
        results = honest.run([Program(FORKS, forks_test, "f") for _ in range(3)])
        assert storm.is_alive(), "the storm ended before the honest scorer ran: the test proves nothing"
    finally:
        storm.join()
    assert [r.statuses for r in results] == [["passed"]] * 3
    # a third scorer while the two hold their blocks gets yet another; a closed one gives its block back
    third = CodeSandbox(CodeSandboxConfig(**config))
    assert third.uid_base not in (stormy.uid_base, honest.uid_base)
    base = honest.uid_base
    honest.close()
    assert CodeSandbox(CodeSandboxConfig(**config)).uid_base == base


HOSTILE = {
    "loop": "def f():\n    while True:\n        pass",
    "sleep": "import time\ndef f():\n    time.sleep(60)",
    "fork_storm": STORM.replace("time.sleep(8)", "time.sleep(2)"),
    "deep_tree": DEEP_TREE.replace('return "done"', "return 'no'"),
    "kill_all": "import os\ndef f():\n    os.kill(-1, 9)\n    os.kill(1, 9)\n    return 'no'",
    "exit_at_import": "import os\nos._exit(0)\ndef f():\n    return 'done'",
    "huge_value": "def f():\n    return 'x' * (64 * 2**20)",
    "cyclic_value": "def f():\n    x = []\n    x.append(x)\n    return x",
    "memory": "def f():\n    x = bytearray(8 * 2**30)\n    return 'done'",
    "close_fds": "import os\ndef f():\n    os.closerange(0, 1024)\n    return 'done'",
}


@pytest.mark.slow
def test_batch_of_200_with_hostile_rows(private_tmp):
    backend = BACKENDS[-1]
    reward = make_code_pass_rate(CodeSandboxConfig(backend=backend, show_progress=False, **FAST))
    completions, tests, entry_points, expected = [], [], [], []
    hostile = list(HOSTILE.values())
    for i in range(200):
        if i % 10 == 3:
            completions.append(block(hostile[(i // 10) % len(hostile)]))
            tests.append(ONE_TEST)
            entry_points.append("f")
            expected.append(0.0)
        else:
            completions.append(GOOD if i % 2 else WRONG)
            tests.append(ADD_TEST)
            entry_points.append("add")
            expected.append(1.0 if i % 2 else 0.5)
    start = time.monotonic()
    scores = reward(completions=completions, test=tests, entry_point=entry_points)
    assert scores == expected
    assert time.monotonic() - start < 600


LISTNODE_HEADER = """
from typing import *

class ListNode:
    def __init__(self, val=0, next=None):
        self.val = val
        self.next = next

def list_node(values: list):
    head = None
    for v in reversed(values):
        head = ListNode(v, head)
    return head

def is_same_list(a, b) -> bool:
    while a is not None and b is not None:
        if type(a) is not ListNode or type(b) is not ListNode or a.val != b.val:
            return False
        a, b = a.next, b.next
    return a is None and b is None
"""
LISTNODE_TEST = """
def check(candidate):
    assert is_same_list(candidate(head=list_node([1, 2, 3])), list_node([3, 2, 1]))
    assert candidate(head=None) is None
    assert is_same_list(candidate(head=list_node(list(range(3000)))), list_node(list(range(2999, -1, -1))))
"""
REVERSE = """
class Solution:
    def reverseList(self, head: Optional[ListNode]) -> Optional[ListNode]:
        previous = None
        while head:
            head.next, previous, head = previous, head, head.next
        return previous
"""


@pytest.mark.slow
def test_leetcode_helper_classes_cross_field_by_field(reward):
    own_class = REVERSE.replace("return previous", "return Mine(previous.val) if previous else None") + (
        "\nclass Mine:\n    def __init__(self, val):\n        self.val = val\n        self.next = None\n"
    )
    scores = reward(
        completions=[block(REVERSE), block(own_class)],
        test=[LISTNODE_TEST] * 2,
        entry_point=["Solution().reverseList"] * 2,
        imports=[LISTNODE_HEADER] * 2,
    )
    # a class the dataset does not define does not cross: only the empty list passes
    assert scores == [1.0, pytest.approx(1 / 3)]


@pytest.mark.slow
def test_exceptions_exits_and_crashes_fail_their_calls_only(reward):
    test = """
def check(candidate):
    try:
        candidate(-1)
        assert False, "no exception"
    except ValueError:
        pass
    assert candidate(2) == 4
    assert candidate(3) == 9
"""
    solutions = {
        "raises_value_error": "def f(x):\n    if x < 0:\n        raise ValueError('negative')\n    return x * x",
        "raises_key_error": "def f(x):\n    if x < 0:\n        raise KeyError('negative')\n    return x * x",
        "exits_on_3": "import sys\ndef f(x):\n    if x < 0:\n        raise ValueError\n    if x == 3:\n"
        "        sys.exit(0)\n    return x * x",
        "crashes_on_3": "import os\ndef f(x):\n    if x < 0:\n        raise ValueError\n    if x == 3:\n"
        "        os.kill(os.getpid(), 9)\n    return x * x",
        "catches_everything_in_test": "def f(x):\n    raise SystemExit",
    }
    scores = reward(completions=[block(c) for c in solutions.values()], test=[test] * 5, entry_point=["f"] * 5)
    assert dict(zip(solutions, scores)) == {
        "raises_value_error": 1.0,
        "raises_key_error": pytest.approx(2 / 3),
        "exits_on_3": pytest.approx(2 / 3),
        "crashes_on_3": pytest.approx(2 / 3),
        "catches_everything_in_test": 0.0,
    }
