"""Run untrusted Python solutions against their tests in a sandbox: the machinery behind `code_pass_rate`.

A *program* is a solution (the code of a completion, with an optional import header) and its tests, each test a
small module that defines `check(candidate)`; a test passes when `check(<entry point>)` returns without an exception.
Every test runs in its own forked processes, as in the QRPO paper's LeetCode setup (one `assert` per fork, 1 GB of
memory, 1 s of CPU, no network, a read-only file system), so that a crash, an infinite loop or a failed assert costs
that test and nothing else.

**The verdict never depends on the solution's interpreter.** Each program gets two sandboxes, joined by a unix
socket pair: the *solution* sandbox holds the solution's code and nothing of its tests; the *test* sandbox holds the
tests (and the dataset's header) and never runs a line of the solution. `check` runs in the test sandbox with
`candidate` a proxy: each call sends its arguments to the solution sandbox and gets the return value back as plain
data (None, bool, int, float, complex, str, bytes, list, tuple, dict, set, frozenset and the dataset's helper classes
such as LeetCode's `ListNode`, of exact types, with size limits; no pickle, no eval). A value that is not plain data,
or a crash, an exit or a timeout of the solution fails the test; the pass token and the statuses stay in the test
sandbox, whose harness writes them to the scorer. See docs/code-rewards.md for the threat model.

Isolation of each sandbox, in layers:

- **Backend `bwrap`** (bubblewrap, `apt-get install bubblewrap`): new network, PID, IPC and UTS namespaces; a root
  file system made of read-only binds of the system directories and of the Python interpreter's standard library
  (its site-packages hidden), a size-limited tmpfs as the only writable place (nothing else of the host, no home, no
  /tmp, no repository, is visible); a fresh /proc and a minimal /dev; an empty environment; no capabilities; the
  bubblewrap arguments passed through a file descriptor, so no host path shows in the sandbox's `/proc/*/cmdline`
  but the interpreter's.
- **Backend `subprocess`** (no sandbox tool, root or user namespaces needed for the full set): `unshare(2)` of
  network, PID, mount, IPC and UTS namespaces; the same minimal root as bwrap's, built by the harness (a read-only
  tmpfs with read-only binds, then `pivot_root(2)`); a size-limited tmpfs as the work directory; a fresh /proc; an
  empty environment. Without a mount namespace (not root, user namespaces refused) host files that any user may
  read stay readable, and the sandbox says so.
- **Both**: the code runs as an unprivileged user (when the scorer runs as root: user ids of its own per scorer
  instance and worker, the solution and test sandboxes each their own, so that the process cap is per sandbox), with
  `resource.setrlimit` limits (address space, CPU seconds per test, processes, file size, open files, no core
  dumps), `PR_SET_NO_NEW_PRIVS`, a seccomp filter that refuses new user namespaces, a wall-clock timeout per test
  and per program, and every process of a test killed before the next one starts.

This file runs on the scorer's side; `trl_qrpo/_sandbox_harness.py` is the harness that runs inside the sandboxes.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import fcntl
import json
import logging
import os
import queue
import re
import shutil
import signal
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._sandbox_harness import ISOLATION_KEYS

logger = logging.getLogger("trl_qrpo.sandbox")

BACKENDS = ("auto", "bwrap", "subprocess")
ENV_PREFIX = "TRL_QRPO_SANDBOX_"
UID_BLOCK = 4096  # user ids claimed by one scorer instance (root runs)

# What "full isolation" means: every one of these is in force (the harness reports each).
ISOLATION_FEATURES = {
    "network": "no network (a new, empty network namespace)",
    "read_only_fs": "read-only file system except a fresh temporary directory",
    "host_files_hidden": "host files outside the system and interpreter directories are not visible",
    "environment": "empty environment (no variable of the scorer, tokens included)",
    "pid_namespace": "own PID namespace (cannot see or signal the scorer's processes)",
    "unprivileged": "tests run as an unprivileged user",
    "process_limit": "a cap on processes per sandbox",
    "resource_limits": "memory, CPU-time, file-size and open-file limits",
    "no_user_namespaces": "no new user namespaces inside the sandbox (seccomp filter)",
    "no_host_sockets": "no unix-domain socket of the host can be reached (seccomp filter: no new unix socket)",
    "write_quota": "a cap on the bytes a solution may write (a size-limited tmpfs as its only writable place)",
}
assert tuple(ISOLATION_FEATURES) == ISOLATION_KEYS


@dataclass
class CodeSandboxConfig:
    """Options of the code sandbox (`trl_qrpo.sandbox.CodeSandbox`) and of `trl_qrpo.rewards.code_pass_rate`.

    Reward functions receive only dataset columns as keyword arguments, so `code_pass_rate` reads its options from
    environment variables `TRL_QRPO_SANDBOX_<FIELD>` (e.g. `TRL_QRPO_SANDBOX_BACKEND=bwrap`,
    `TRL_QRPO_SANDBOX_REQUIRE_FULL_ISOLATION=1`), see [`CodeSandboxConfig.from_env`]; in Python,
    `make_code_pass_rate(CodeSandboxConfig(...))` returns a reward function with the given options.
    """

    backend: str = field(
        default="auto",
        metadata={
            "help": "Sandbox backend: 'bwrap' (bubblewrap: namespaces and a minimal read-only root file system), "
            "'subprocess' (a locked-down subprocess: unshare(2), read-only remounts and resource limits; the full "
            "set needs root), or 'auto' (bwrap when it is installed and works here, else subprocess).",
            "choices": list(BACKENDS),
        },
    )
    require_full_isolation: bool = field(
        default=False,
        metadata={
            "help": "Refuse to run (raise) unless every isolation feature is in force: no network, read-only file "
            "system, host files hidden, empty environment, own PID namespace, unprivileged user, process cap, "
            "resource limits, no user namespaces, no host unix sockets, write quota. Both backends provide all of "
            "them when run as root or where user namespaces are allowed."
        },
    )
    cpu_time_limit: int = field(
        default=1,
        metadata={"help": "CPU seconds per test (RLIMIT_CPU, whole seconds; the paper: 1 s)."},
    )
    test_timeout: float = field(
        default=5.0,
        metadata={
            "help": "Wall-clock seconds per test (catches sleeping or blocked code, which uses no CPU). A test that "
            "runs out of time fails."
        },
    )
    timeout: float = field(
        default=60.0,
        metadata={
            "help": "Wall-clock seconds per solution, all its tests and the sandbox start included; tests not run "
            "by then fail."
        },
    )
    memory_mb: int = field(
        default=1024,
        metadata={"help": "Address-space limit per process, MiB (RLIMIT_AS; the paper: 1 GB)."},
    )
    max_processes: int = field(
        default=64,
        metadata={
            "help": "Processes (and threads) a sandbox may run at once (RLIMIT_NPROC of its unprivileged user)."
        },
    )
    max_file_mb: int = field(
        default=16,
        metadata={"help": "Largest file a test may write, MiB (RLIMIT_FSIZE)."},
    )
    max_disk_mb: int = field(
        default=64,
        metadata={
            "help": "Bytes a solution (and, apart, its tests) may write in all, MiB: the size of the tmpfs that is "
            "their only writable place (its work directory), so nothing they write reaches the host's disk."
        },
    )
    max_value_mb: int = field(
        default=16,
        metadata={
            "help": "Largest value (arguments of a call, or its return value) that crosses between the test and "
            "the solution, MiB of encoded data; a larger one fails its test."
        },
    )
    max_value_parts: int = field(
        default=2_000_000,
        metadata={
            "help": "Most parts (each int, str, list, ... counts one) of a value that crosses between the test and "
            "the solution; a larger one fails its test."
        },
    )
    max_open_files: int = field(default=256, metadata={"help": "Open files per process (RLIMIT_NOFILE)."})
    num_workers: int | None = field(
        default=None,
        metadata={"help": "Solutions run in parallel (one sandbox each). Default: the number of CPU cores."},
    )
    code_block: str = field(
        default="first",
        metadata={
            "help": "Which fenced Python block of a completion is the solution: 'first', 'last', or 'all' "
            "(concatenated). A completion without a complete ```python block scores 0 (the paper's rule).",
            "choices": ["first", "last", "all"],
        },
    )
    python: str | None = field(
        default=None,
        metadata={"help": "Interpreter that runs the tests inside the sandbox. Default: the scorer's own."},
    )
    site_packages: bool = field(
        default=False,
        metadata={
            "help": "Let solutions import the interpreter's installed packages (numpy, ...). Off: the standard "
            "library only (what HumanEval and LeetCode problems need), and no site start-up hooks run."
        },
    )
    sandbox_uid: int = field(
        default=2_000_000_000,
        metadata={
            "help": "When the scorer runs as root: the first of the user ids the sandboxes run as (no account "
            "needed). Each scorer instance claims a block of 4096 ids from there (a lock file per block, so two "
            "scorers, in one process or two, never share one), and each worker two ids of its block, one for the "
            "solution's sandbox and one for the tests': the process cap is per sandbox. Ignored otherwise."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar over solutions."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {list(BACKENDS)}.")
        if self.code_block not in ("first", "last", "all"):
            raise ValueError(f"code_block={self.code_block!r}: choose 'first', 'last' or 'all'.")
        for name in (
            "cpu_time_limit",
            "memory_mb",
            "max_processes",
            "max_file_mb",
            "max_open_files",
            "max_disk_mb",
            "max_value_mb",
            "max_value_parts",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.test_timeout <= 0 or self.timeout <= 0:
            raise ValueError("test_timeout and timeout must be positive (seconds).")
        if self.num_workers is not None and not 1 <= self.num_workers <= UID_BLOCK // 2:
            raise ValueError(
                f"num_workers={self.num_workers} must be between 1 and {UID_BLOCK // 2} (or None: one per CPU core)."
            )
        if not 1 <= self.sandbox_uid <= 2**32 - 2 - 64 * UID_BLOCK:
            raise ValueError(f"sandbox_uid={self.sandbox_uid} must be between 1 and {2**32 - 2 - 64 * UID_BLOCK}.")

    @classmethod
    def from_env(cls, environ=None, **overrides) -> CodeSandboxConfig:
        """The configuration from environment variables `TRL_QRPO_SANDBOX_<FIELD NAME>` (then `overrides`).

        Booleans accept 1/0, true/false, yes/no; `NUM_WORKERS` and `PYTHON` accept an empty value for the default.
        """
        environ = os.environ if environ is None else environ
        values = {}
        for f in dataclasses.fields(cls):
            raw = environ.get(ENV_PREFIX + f.name.upper())
            if raw is None:
                continue
            values[f.name] = _parse_env(f, raw)
        values.update(overrides)
        return cls(**values)


def _parse_env(f, raw: str):
    name = ENV_PREFIX + f.name.upper()
    kind = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
    raw = raw.strip()
    if "None" in kind and raw in ("", "none", "None"):
        return None
    try:
        if kind.startswith("bool"):
            if raw.lower() in ("1", "true", "yes", "on"):
                return True
            if raw.lower() in ("0", "false", "no", "off"):
                return False
            raise ValueError(raw)
        if kind.startswith("int"):
            return int(raw)
        if kind.startswith("float"):
            return float(raw)
    except ValueError:
        raise ValueError(f"Environment variable {name}={raw!r} is not a valid {kind}.") from None
    return raw


class SandboxUnavailableError(RuntimeError):
    """The requested sandbox backend or isolation level is not available on this machine."""


# ----------------------------------------------------------------------------------------------------------------
# Programs: code extraction and test splitting (trusted side)
# ----------------------------------------------------------------------------------------------------------------

_BLOCK = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\r?\n(.*?)```", re.DOTALL | re.IGNORECASE)


def extract_code(text: str, which: str = "first") -> str | None:
    """The solution in a completion: its fenced ```python block(s) (`which`: 'first', 'last' or 'all').

    Returns `None` when there is no complete block (no opening ```python / ```py fence, or no closing fence).
    """
    blocks = _BLOCK.findall(text or "")
    if not blocks:
        return None
    if which == "first":
        return blocks[0]
    if which == "last":
        return blocks[-1]
    return "\n\n".join(blocks)


def _contains_assert(node: ast.AST) -> bool:
    """Whether `node` has an assert statement outside nested function/class definitions."""
    stack = [node]
    while stack:
        current = stack.pop()
        if isinstance(current, ast.Assert):
            # `assert True, "..."` (37 of HumanEval's checks have one) tests nothing: not counted
            if not (isinstance(current.test, ast.Constant) and current.test.value):
                return True
            continue
        for child in ast.iter_child_nodes(current):
            if not isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)):
                stack.append(child)
    return False


def split_tests(test: str) -> list[str]:
    """The tests of a `check(candidate)` module, one module source per test (HumanEval / LeetCodeDataset format).

    The rule: every top-level statement of `check`'s body that holds an `assert` (outside nested function or class
    definitions) is one test; a loop or an `if`/`with`/`try` block of asserts is one test (it passes when the whole
    statement runs without an exception). The other statements of the body (assignments, imports, helper
    definitions) are set-up: test k runs every set-up statement before it, in order, then its own statement.
    An assert of a true constant (`assert True, "..."`) tests nothing and is not counted. A `check` without any
    other assert is one test (calling it must not raise). The rest of the module (imports, constants, helpers) is
    kept in every test.

    Raises:
        ValueError: the source does not parse, is too large or too deeply nested, or defines no top-level `check`
            function.
    """
    if len(test) > MAX_TEST_CHARS:
        raise ValueError(f"it is {len(test)} characters long, more than the {MAX_TEST_CHARS} a test may have")
    try:
        return _split_tests(test)
    except (RecursionError, MemoryError):
        raise ValueError("it is too deeply nested (or too large) to parse") from None


MAX_TEST_CHARS = 2_000_000


def _split_tests(test: str) -> list[str]:
    tree = ast.parse(test)
    checks = [i for i, node in enumerate(tree.body) if isinstance(node, ast.FunctionDef) and node.name == "check"]
    if not checks:
        raise ValueError("it defines no top-level function `check(candidate)`")
    index = checks[-1]
    check = tree.body[index]
    definitions = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)
    tests = [i for i, stmt in enumerate(check.body) if not isinstance(stmt, definitions) and _contains_assert(stmt)]
    if not tests:
        return [test]
    sources = []
    for k in tests:
        body = [stmt for i, stmt in enumerate(check.body) if i < k and i not in tests] + [check.body[k]]
        unit = copy.copy(check)
        unit.body = body
        module = ast.Module(body=tree.body[:index] + [unit] + tree.body[index + 1 :], type_ignores=[])
        sources.append(ast.unparse(ast.fix_missing_locations(module)))
    return sources


@dataclass
class Program:
    """A solution and its tests.

    Args:
        solution (`str` or `None`): the code (import header included); `None` when the completion had no code block.
        tests (`list[str]`): one module source per test, each defining `check(candidate)` (see [`split_tests`]).
        entry_point (`str`): the expression that names the function under test (`"add"`, `"Solution().twoSum"`).
        header (`str`, *optional*): the dataset's code that the tests may use (its `imports` column: LeetCode's
            import header and helper classes, HumanEval's helper functions). It runs before the tests, on the trusted
            side; `solution` should include it too (the solution's side runs only `solution`).
    """

    solution: str | None
    tests: list[str]
    entry_point: str
    header: str = ""


@dataclass
class ProgramResult:
    """Outcome of each test of a program: 'passed', 'failed', 'timeout', 'syntax_error', 'no_code' or 'error'."""

    statuses: list[str]
    detail: str = ""

    @property
    def pass_rate(self) -> float:
        return sum(s == "passed" for s in self.statuses) / len(self.statuses) if self.statuses else 0.0


# ----------------------------------------------------------------------------------------------------------------
# The sandbox (trusted side)
# ----------------------------------------------------------------------------------------------------------------


_HARNESS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_sandbox_harness.py")
_HARNESS_IN_SANDBOX = "/run/trl-qrpo/harness.py"
_WORKDIR_IN_SANDBOX = "/sandbox"
_SAFE_PATH = "/usr/local/bin:/usr/bin:/bin"


def _interpreter_info(python: str) -> dict:
    code = (
        "import json, os, site, sys, sysconfig; print(json.dumps({'prefix': sys.prefix, 'base_prefix': "
        "sys.base_prefix, 'executable': os.path.realpath(sys.executable), 'site': site.getsitepackages(), "
        "'stdlib': sysconfig.get_paths()['stdlib'], 'base_site': os.path.join(sys.base_prefix, 'lib', "
        "'python%d.%d' % sys.version_info[:2], 'site-packages')}))"
    )
    out = subprocess.run([python, "-I", "-c", code], check=False, capture_output=True, text=True, timeout=60, env={})
    if out.returncode != 0:
        raise SandboxUnavailableError(f"The sandbox interpreter {python!r} does not run: {out.stderr[-500:]}")
    return json.loads(out.stdout)


def _uid_lock_dir() -> str | None:
    """A directory of lock files only root can write (root runs), where scorers claim their blocks of user ids."""
    for path in ("/run/trl-qrpo-uids", os.path.join(tempfile.gettempdir(), "trl-qrpo-uid-locks")):
        try:
            os.makedirs(path, mode=0o700, exist_ok=True)
            info = os.lstat(path)
            if stat.S_ISDIR(info.st_mode) and info.st_uid == os.geteuid() and not info.st_mode & 0o022:
                return path
        except OSError:
            continue
    return None


def _claim_uid_block(base: int) -> tuple[int, int | None]:
    """The first id of a block of UID_BLOCK user ids that no other live scorer holds, and the lock's descriptor.

    A block is held by an exclusive `flock` on its lock file for as long as the descriptor is open: released when
    the scorer closes, or its process ends (even killed)."""
    folder = _uid_lock_dir()
    if folder is None:
        logger.warning("No private directory for the sandbox user-id locks: scorers may share user ids.")
        return base, None
    for k in range(64):
        start = base + k * UID_BLOCK
        try:
            fd = os.open(os.path.join(folder, f"{start}.lock"), os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW, 0o600)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return start, fd
        except OSError:
            os.close(fd)
    raise SandboxUnavailableError(
        f"64 code scorers already hold sandbox user ids from {base}: close some (CodeSandbox.close) or set "
        "sandbox_uid to another range."
    )


def _release(fd: int | None) -> None:
    if fd is not None:
        try:
            os.close(fd)
        except OSError:
            pass


def remove_tree(path: str) -> bool:
    """Remove a directory tree that untrusted code wrote, whatever it holds; never raises. True when it is gone.

    Iterative (a tree thousands of directories deep does not exhaust the stack), makes read-only directories
    writable first, takes names as bytes (any name), never follows a symbolic link; what a path-based walk cannot
    reach (paths longer than PATH_MAX) is left to `rm -rf`."""
    try:
        root = os.fsencode(path)
        stack = [(root, False)]
        steps = 0
        while stack and steps < 1_000_000:
            steps += 1
            current, expanded = stack.pop()
            if expanded:
                try:
                    os.rmdir(current)
                except OSError:
                    pass
                continue
            try:
                os.chmod(current, 0o700, follow_symlinks=False)
            except (OSError, NotImplementedError):
                pass
            stack.append((current, True))
            try:
                with os.scandir(current) as entries:
                    children = list(entries)
            except OSError:
                continue
            for entry in children:
                try:
                    if entry.is_dir(follow_symlinks=False):
                        stack.append((entry.path, False))
                    else:
                        os.unlink(entry.path)
                except OSError:
                    pass
        if os.path.lexists(root):
            subprocess.run(
                ["rm", "-rf", "--one-file-system", "--", root],
                check=False,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                timeout=120,
                env={"PATH": _SAFE_PATH},
            )
        gone = not os.path.lexists(root)
    except BaseException as error:  # noqa: BLE001 (cleaning up must never stop the scorer)
        if isinstance(error, KeyboardInterrupt):
            raise
        gone = False
    if not gone:
        logger.warning(f"Could not remove the sandbox work directory {path!r}: remove it by hand.")
    return gone


class CodeSandbox:
    """Runs [`Program`]s in parallel sandboxes; see the module's documentation for what is isolated and how.

    Args:
        config ([`CodeSandboxConfig`], *optional*): the options (default: `CodeSandboxConfig.from_env()`).

    Raises:
        SandboxUnavailableError: the backend asked for does not work here, or `require_full_isolation` is set and
            some isolation feature is missing.
    """

    def __init__(self, config: CodeSandboxConfig | None = None):
        self.config = config if config is not None else CodeSandboxConfig.from_env()
        self.python = self.config.python or sys.executable
        self._info = _interpreter_info(self.python)
        self.is_root = os.geteuid() == 0
        self.num_workers = self.config.num_workers or os.cpu_count() or 1
        self.uid_base, self._release_uids, self._closed = None, None, False
        if self.is_root:
            # user ids of our own: another scorer's fork storm cannot exhaust our process cap
            self.uid_base, lock = _claim_uid_block(self.config.sandbox_uid)
            self._release_uids = weakref.finalize(self, _release, lock)
        # one pair of user ids per slot (root runs): a sandbox's process cap is its own; callers beyond num_workers
        # wait
        self._slots = queue.Queue()
        for slot in range(self.num_workers):
            self._slots.put(slot)
        self.backend, self.isolation, self.probe_detail = self._select_backend()
        self.lacks = [name for name, present in self.isolation.items() if not present]
        message = f"Code sandbox: backend '{self.backend}'" + (
            ", full isolation."
            if not self.lacks
            else f"; missing: {'; '.join(ISOLATION_FEATURES[n] for n in self.lacks)}."
        )
        if self.lacks and self.config.require_full_isolation:
            raise SandboxUnavailableError(
                message + " require_full_isolation is set: install bubblewrap (apt-get install bubblewrap), run the "
                f"scorer as root or where user namespaces are allowed, and use backend 'bwrap'. {self.probe_detail}"
            )
        (logger.warning if self.lacks else logger.info)(message)

    def close(self) -> None:
        """Give back this scorer's user ids (also done when it is garbage-collected or its process ends)."""
        if self._release_uids is not None:
            self._release_uids()  # runs once
        self._closed = True

    def _uids(self, slot: int) -> tuple[int | None, int | None]:
        """User ids of the solution's sandbox and of the tests' sandbox of a slot (root runs)."""
        if self.uid_base is None:
            return None, None
        return self.uid_base + 2 * slot, self.uid_base + 2 * slot + 1

    # -- backend selection ---------------------------------------------------------------------------------------

    def _select_backend(self):
        wanted = self.config.backend
        if wanted in ("auto", "bwrap"):
            if shutil.which("bwrap") is None:
                if wanted == "bwrap":
                    raise SandboxUnavailableError(
                        "backend='bwrap' but bubblewrap is not installed: apt-get install bubblewrap (or choose "
                        "backend='subprocess')."
                    )
            else:
                ok, isolation, detail = self._probe("bwrap")
                if ok:
                    return "bwrap", isolation, detail
                if wanted == "bwrap":
                    raise SandboxUnavailableError(f"bubblewrap does not work on this machine: {detail}")
                logger.warning(f"bubblewrap is installed but does not work here ({detail}); using 'subprocess'.")
        ok, isolation, detail = self._probe("subprocess")
        if not ok:
            raise SandboxUnavailableError(f"The subprocess sandbox does not start: {detail}")
        return "subprocess", isolation, detail

    def _probe(self, backend: str):
        result = self._probe_job(backend)
        if "isolation" not in result:
            return False, {}, result.get("error", "no answer from the sandbox")
        isolation = {name: bool(result["isolation"].get(name)) for name in ISOLATION_FEATURES}
        return True, isolation, result.get("detail", "")

    # -- commands ------------------------------------------------------------------------------------------------

    def _hidden_dirs(self) -> list[str]:
        """Directories of installed packages that the sandboxed code must not read (datasets ship in packages)."""
        if self.config.site_packages:
            return []
        dirs = set(self._info["site"]) | {self._info["base_site"]}
        return sorted(d for d in dirs if os.path.isdir(d))

    def _bwrap_args(self, role: str) -> list[str]:
        """bubblewrap's options (passed through a descriptor, `--args`: they do not show in /proc/*/cmdline)."""
        args = [
            "--unshare-ipc",
            "--unshare-pid",
            "--unshare-net",
            "--unshare-uts",
            "--unshare-cgroup-try",
            "--die-with-parent",
            "--new-session",
            "--clearenv",
            "--hostname",
            "sandbox",
        ]
        if role == "solution":
            # the harness is the namespace's init: a solution's kill(-1) or kill(1) cannot stop it
            args += ["--as-pid-1"]
        if self.is_root:
            # Capabilities to switch to the unprivileged user id (dropped with it, before any test code runs).
            args += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        else:
            args += ["--unshare-user", "--disable-userns"]
        args += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                args += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                args += ["--ro-bind", top, top]
        args += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        made = {"/"}
        for path in self._interpreter_dirs():
            if path == "/usr" or path.startswith("/usr/"):
                continue
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/" + "/".join(parts[:i])
                if parent not in made:
                    args += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            args += ["--ro-bind", path, path]
            made.add(path)
        for path in self._hidden_dirs():
            args += ["--tmpfs", path]
        args += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--ro-bind",
            _HARNESS,
            _HARNESS_IN_SANDBOX,
            "--perms",
            "1777",
            "--size",
            str(self.config.max_disk_mb * 2**20),
            "--tmpfs",
            _WORKDIR_IN_SANDBOX,
            "--chdir",
            _WORKDIR_IN_SANDBOX,
            "--remount-ro",
            "/",
        ]
        for key, value in self._sandbox_env(_WORKDIR_IN_SANDBOX).items():
            args += ["--setenv", key, value]
        return args

    def _interpreter_dirs(self) -> list[str]:
        """What the sandbox binds of the interpreter: its standard library's prefix (and the site-packages of the
        configured interpreter when `site_packages` is on); not a virtual environment's other files."""
        dirs = {self._info["base_prefix"], os.path.dirname(self._info["executable"])}
        if self.config.site_packages:
            dirs |= {self._info["prefix"], *self._info["site"]}
        # keep only the outermost of nested directories
        ordered = sorted(os.path.normpath(d) for d in dirs)
        out = []
        for d in ordered:
            if not any(d == o or d.startswith(o + "/") for o in out):
                out.append(d)
        return out

    @staticmethod
    def _sandbox_env(workdir: str) -> dict:
        return {"PATH": _SAFE_PATH, "HOME": workdir, "TMPDIR": workdir, "LANG": "C.UTF-8", "PYTHONHASHSEED": "0"}

    def _fallback_root(self) -> tuple[list[str], list[list[str]]]:
        """What the fallback's minimal root binds (read-only), and the symbolic links it recreates."""
        binds, links = ["/usr"], []
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                links.append([os.readlink(top), top])
            elif os.path.isdir(top):
                binds.append(top)
        binds.append("/etc/ld.so.cache")
        binds += [d for d in self._interpreter_dirs() if not (d == "/usr" or d.startswith("/usr/"))]
        return binds, links

    def _job(self, role: str, backend: str, uid, workdir: str | None) -> dict:
        binds, links = self._fallback_root()
        return {
            "role": role,
            "backend": backend,
            "workdir": workdir if backend == "subprocess" else _WORKDIR_IN_SANDBOX,
            "binds": binds,
            "symlinks": links,
            "hide": self._hidden_dirs(),
            "uid": uid,
            "limits": {
                "memory": self.config.memory_mb * 2**20,
                "processes": self.config.max_processes,
                "file_size": self.config.max_file_mb * 2**20,
                "open_files": self.config.max_open_files,
                "cpu": self.config.cpu_time_limit,
                "disk": self.config.max_disk_mb * 2**20,
                "value_bytes": self.config.max_value_mb * 2**20,
                "value_nodes": self.config.max_value_parts,
            },
            "test_timeout": self.config.test_timeout,
            "sys_path": self._info["site"] if self.config.site_packages else [],
        }

    def _start(self, role: str, backend: str, uid, job: dict, pass_fds: tuple, capture: bool):
        """Start one sandbox with its job on stdin. Returns (process, host work directory or None)."""
        workdir = None
        python = self._info["executable"]
        flags = ["-I", "-S"]
        if backend == "subprocess":
            workdir = tempfile.mkdtemp(prefix="trl-qrpo-sandbox-")
            if uid is not None:
                # owned by the sandbox user; group root so that the sandbox's root (no capabilities) may enter it
                os.chown(workdir, uid, 0)
                os.chmod(workdir, 0o770)
            job = {**job, "workdir": workdir}
            # the harness through a descriptor: no host path of the repository in the sandbox's /proc/*/cmdline
            args_r = os.open(_HARNESS, os.O_RDONLY)
            command = [python, *flags, f"/proc/self/fd/{args_r}"]
            env, fds = self._sandbox_env(workdir), (*pass_fds, args_r)
        else:
            args_r, args_w = os.pipe()
            data = b"\0".join(a.encode() for a in self._bwrap_args(role)) + b"\0"
            if len(data) > 60_000:  # a pipe holds 64 KiB: more would block before bwrap reads it
                os.close(args_r)
                os.close(args_w)
                raise SandboxUnavailableError("the bubblewrap command line is too long")
            os.write(args_w, data)
            os.close(args_w)
            command = ["bwrap", "--args", str(args_r), python, *flags, _HARNESS_IN_SANDBOX]
            env, fds = {"PATH": _SAFE_PATH}, (*pass_fds, args_r)
        try:
            proc = subprocess.Popen(
                command,
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE if capture else subprocess.DEVNULL,
                stderr=subprocess.PIPE if capture else subprocess.DEVNULL,
                cwd=workdir or "/",
                env=env,
                start_new_session=True,
                close_fds=True,
                pass_fds=fds,
            )
        except OSError:
            if workdir is not None:
                remove_tree(workdir)
            raise
        finally:
            if args_r is not None:
                os.close(args_r)
        return proc, job, workdir

    def _probe_job(self, backend: str) -> dict:
        job = self._job("probe", backend, self._uids(0)[0], None)
        workdir = None
        try:
            try:
                proc, job, workdir = self._start("probe", backend, self._uids(0)[0], job, (), capture=True)
            except (OSError, SandboxUnavailableError) as error:
                return {"error": f"cannot start the sandbox: {error}"}
            try:
                out, err = proc.communicate(json.dumps(job).encode(), timeout=30.0)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                proc.communicate()
                return {"error": "timeout"}
            finally:
                _kill_group(proc.pid)
            answer = _last_json(out)
            if answer is None:
                return {
                    "error": f"the sandbox exited with status {proc.returncode}: {err.decode(errors='replace')[-800:]}"
                }
            return answer
        finally:
            if workdir is not None:
                remove_tree(workdir)

    def _run_pair(self, program: Program, backend: str, slot: int, timeout: float) -> dict:
        """The solution's sandbox and the tests' sandbox, joined by a socket pair; the statuses come from the tests'
        sandbox only."""
        solution_uid, test_uid = self._uids(slot)
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        procs, workdirs = [], []
        try:
            solution_job = {
                **self._job("solution", backend, solution_uid, None),
                "solution": program.solution,
                "entry_point": program.entry_point,
                "ctl_fd": theirs.fileno(),
            }
            test_job = {
                **self._job("test", backend, test_uid, None),
                "tests": program.tests,
                "header": program.header or "",
                "deadline": self.config.timeout,
                "ctl_fd": ours.fileno(),
            }
            try:
                sol, solution_job, workdir = self._start(
                    "solution", backend, solution_uid, solution_job, (theirs.fileno(),), capture=False
                )
                procs.append(sol)
                workdirs.append(workdir)
                tst, test_job, workdir = self._start("test", backend, test_uid, test_job, (ours.fileno(),), True)
                procs.append(tst)
                workdirs.append(workdir)
            except (OSError, SandboxUnavailableError) as error:
                return {"error": f"cannot start the sandbox: {error}"}
            finally:
                ours.close()
                theirs.close()
            feeder = threading.Thread(target=_feed, args=(sol, json.dumps(solution_job).encode()), daemon=True)
            feeder.start()
            try:
                out, err = tst.communicate(json.dumps(test_job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(tst.pid)
                out, err = tst.communicate()
                return {"error": "timeout", "partial": _last_json(out)}
            answer = _last_json(out)
            if answer is None:
                return {
                    "error": f"the sandbox exited with status {tst.returncode}: {err.decode(errors='replace')[-800:]}"
                }
            return answer
        finally:
            for proc in procs:
                _kill_group(proc.pid)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    pass
            for workdir in workdirs:
                if workdir is not None:
                    remove_tree(workdir)

    def run_program(self, program: Program) -> ProgramResult:
        """Run one program's tests (each in its own processes); never raises for anything the solution does."""
        if not program.tests:
            return ProgramResult([], "no tests")
        if program.solution is None:
            return ProgramResult(["no_code"] * len(program.tests), "no ```python block")
        if self._closed:
            raise SandboxUnavailableError("This CodeSandbox was closed (its user ids given back): make a new one.")
        slot = self._slots.get()
        try:
            start = time.monotonic()
            answer = self._run_pair(program, self.backend, slot, timeout=self.config.timeout + 10.0)
        finally:
            self._slots.put(slot)
        statuses = answer.get("statuses")
        if (
            not isinstance(statuses, list)
            or len(statuses) != len(program.tests)
            or not all(isinstance(s, str) for s in statuses)
        ):
            error = answer.get("error", "")
            if error.startswith("cannot start"):
                raise SandboxUnavailableError(f"The '{self.backend}' sandbox {error}")
            # The tests' harness gave no answer: out of time, or a sandbox failure. The tests fail ('error').
            partial = [s for s in ((answer.get("partial") or {}).get("statuses") or []) if isinstance(s, str)]
            partial = partial[: len(program.tests)]
            missing = len(program.tests) - len(partial)
            statuses = list(partial) + ["timeout" if error == "timeout" else "error"] * missing
            return ProgramResult(statuses, f"{error} after {time.monotonic() - start:.1f} s")
        return ProgramResult(list(statuses), str(answer.get("detail", "")))

    def run(self, programs: Sequence[Program], desc: str = "Running tests") -> list[ProgramResult]:
        """Run programs in parallel (`num_workers` sandboxes at a time), with a progress bar."""
        from concurrent.futures import ThreadPoolExecutor, as_completed

        results: list[ProgramResult | None] = [None] * len(programs)
        progress = None
        if self.config.show_progress and len(programs) > 1:
            from tqdm.auto import tqdm

            progress = tqdm(total=len(programs), desc=desc, unit="solution", leave=False, mininterval=1.0)
        try:
            with ThreadPoolExecutor(max_workers=min(self.num_workers, max(1, len(programs)))) as pool:
                futures = {pool.submit(self.run_program, p): i for i, p in enumerate(programs)}
                for future in as_completed(futures):
                    results[futures[future]] = future.result()
                    if progress is not None:
                        progress.update(1)
        finally:
            if progress is not None:
                progress.close()
        return results

    def describe(self) -> str:
        present = [ISOLATION_FEATURES[n] for n, ok in self.isolation.items() if ok]
        missing = [ISOLATION_FEATURES[n] for n in self.lacks]
        return f"backend {self.backend}; in force: {'; '.join(present)}; missing: {'; '.join(missing) or 'nothing'}"


def _feed(proc, data: bytes) -> None:
    try:
        proc.stdin.write(data)
    except (OSError, ValueError):
        pass
    finally:
        try:
            proc.stdin.close()
        except (OSError, ValueError):
            pass


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_json(out: bytes | None):
    for line in reversed((out or b"").decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                answer = json.loads(line)
            except ValueError:
                return None
            return answer if isinstance(answer, dict) else None
    return None
