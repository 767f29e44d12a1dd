"""Run untrusted Python solutions against their tests in a sandbox: the machinery behind `code_pass_rate`.

A *program* is a solution (the code of a completion, with an optional import header) and its tests, each test a
small module that defines `check(candidate)`; a test passes when `check(<entry point>)` returns without an exception.
Every test runs in its own forked process, as in the QRPO paper's LeetCode setup (one `assert` per fork, 1 GB of
memory, 1 s of CPU, no network, a read-only file system), so that a crash, an infinite loop or a failed assert costs
that test and nothing else.

Isolation, in layers (see `docs/code-rewards.md`):

- **Backend `bwrap`** (bubblewrap, `apt-get install bubblewrap`): new network, PID, IPC and UTS namespaces; a root
  file system made of read-only binds of the system directories and of the Python interpreter, a fresh temporary
  directory as the only writable place (nothing else of the host, no home, no /tmp, no repository, is visible);
  a fresh /proc and a minimal /dev; an empty environment; no capabilities.
- **Backend `subprocess`** (no sandbox tool, root needed for the full set): `unshare(2)` of network, PID, mount,
  IPC and UTS namespaces; every mount remounted read-only except the temporary directory; a fresh /proc; an empty
  environment. Host files that any user may read stay readable (they are not hidden as with bwrap).
- **Both**: the tests run as an unprivileged user (when the scorer runs as root: one user id per worker, so that
  the process cap is per sandbox), with `resource.setrlimit` limits (address space, CPU seconds per test, processes,
  file size, open files, no core dumps), `PR_SET_NO_NEW_PRIVS`, a wall-clock timeout per test and per program, and
  every process of a test killed before the next one starts.

The result of a test is read from a pipe, as a random token that the test process writes after `check` returns,
together with its exit status: a solution that exits early (`os._exit(0)`, `sys.exit()`) does not pass. This file
runs on the scorer's side; `trl_qrpo/_sandbox_harness.py` is the harness that runs inside the sandbox.
"""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import logging
import os
import queue
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

from ._sandbox_harness import ISOLATION_KEYS

logger = logging.getLogger("trl_qrpo.sandbox")

BACKENDS = ("auto", "bwrap", "subprocess")
ENV_PREFIX = "TRL_QRPO_SANDBOX_"

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
            "resource limits. Only the bwrap backend run as root (or with user namespaces) provides all of them."
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
            "help": "When the scorer runs as root: tests run as user id sandbox_uid + worker index (no account "
            "needed; one id per worker makes the process cap per sandbox). Ignored otherwise."
        },
    )
    show_progress: bool = field(default=True, metadata={"help": "Show a progress bar over solutions."})

    def __post_init__(self):
        if self.backend not in BACKENDS:
            raise ValueError(f"backend={self.backend!r}: choose one of {list(BACKENDS)}.")
        if self.code_block not in ("first", "last", "all"):
            raise ValueError(f"code_block={self.code_block!r}: choose 'first', 'last' or 'all'.")
        for name in ("cpu_time_limit", "memory_mb", "max_processes", "max_file_mb", "max_open_files"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name}={getattr(self, name)} must be at least 1.")
        if self.test_timeout <= 0 or self.timeout <= 0:
            raise ValueError("test_timeout and timeout must be positive (seconds).")
        if self.num_workers is not None and self.num_workers < 1:
            raise ValueError(f"num_workers={self.num_workers} must be at least 1 (or None: one per CPU core).")

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
        ValueError: the source does not parse, or defines no top-level `check` function.
    """
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
    """

    solution: str | None
    tests: list[str]
    entry_point: str


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
        "import json, os, site, sys; print(json.dumps({'prefix': sys.prefix, 'base_prefix': sys.base_prefix, "
        "'executable': os.path.realpath(sys.executable), 'site': site.getsitepackages()}))"
    )
    out = subprocess.run([python, "-I", "-c", code], check=False, capture_output=True, text=True, timeout=60, env={})
    if out.returncode != 0:
        raise SandboxUnavailableError(f"The sandbox interpreter {python!r} does not run: {out.stderr[-500:]}")
    return json.loads(out.stdout)


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
        # one user id per slot (root runs): a sandbox's process cap is its own; callers beyond num_workers wait
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
        result = self._run_job({"probe": True}, backend, slot=0, timeout=30.0)
        if "isolation" not in result:
            return False, {}, result.get("error", "no answer from the sandbox")
        isolation = {name: bool(result["isolation"].get(name)) for name in ISOLATION_FEATURES}
        return True, isolation, result.get("detail", "")

    # -- running -------------------------------------------------------------------------------------------------

    def _command(self, backend: str, workdir: str) -> list[str]:
        flags = ["-I", "-S"]
        if backend == "subprocess":
            return [self.python, *flags, _HARNESS]
        cmd = [
            "bwrap",
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
        if self.is_root:
            # Capabilities to switch to the unprivileged user id (dropped with it, before any test code runs).
            cmd += ["--cap-drop", "ALL", "--cap-add", "CAP_SETUID", "--cap-add", "CAP_SETGID"]
        cmd += ["--ro-bind", "/usr", "/usr"]
        for top in ("/bin", "/sbin", "/lib", "/lib32", "/lib64", "/libx32"):
            if os.path.islink(top):
                cmd += ["--symlink", os.readlink(top), top]
            elif os.path.isdir(top):
                cmd += ["--ro-bind", top, top]
        cmd += ["--ro-bind-try", "/etc/ld.so.cache", "/etc/ld.so.cache"]
        made = {"/"}
        for path in self._interpreter_dirs():
            if path == "/usr" or path.startswith("/usr/"):
                continue
            parts = path.strip("/").split("/")
            for i in range(1, len(parts)):
                parent = "/" + "/".join(parts[:i])
                if parent not in made:
                    cmd += ["--perms", "0755", "--dir", parent]
                    made.add(parent)
            cmd += ["--ro-bind", path, path]
            made.add(path)
        cmd += [
            "--proc",
            "/proc",
            "--dev",
            "/dev",
            "--ro-bind",
            _HARNESS,
            _HARNESS_IN_SANDBOX,
            "--bind",
            workdir,
            _WORKDIR_IN_SANDBOX,
            "--chdir",
            _WORKDIR_IN_SANDBOX,
            "--remount-ro",
            "/",
        ]
        for key, value in self._sandbox_env(_WORKDIR_IN_SANDBOX).items():
            cmd += ["--setenv", key, value]
        return cmd + [self.python, *flags, _HARNESS_IN_SANDBOX]

    def _interpreter_dirs(self) -> list[str]:
        dirs = {self._info["prefix"], self._info["base_prefix"], os.path.dirname(self._info["executable"])}
        if os.path.realpath(self.python) != self.python:
            dirs.add(os.path.dirname(os.path.abspath(self.python)))
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

    def _run_job(self, job: dict, backend: str, slot: int, timeout: float) -> dict:
        workdir = tempfile.mkdtemp(prefix="trl-qrpo-sandbox-")
        uid = self.config.sandbox_uid + slot if self.is_root else None
        try:
            if uid is not None:
                # owned by the sandbox user; group root so that the sandbox's root (no capabilities) may enter it
                os.chown(workdir, uid, 0)
                os.chmod(workdir, 0o770)
            job = {
                **job,
                "backend": backend,
                "workdir": workdir if backend == "subprocess" else _WORKDIR_IN_SANDBOX,
                "uid": uid,
                "limits": {
                    "memory": self.config.memory_mb * 2**20,
                    "processes": self.config.max_processes,
                    "file_size": self.config.max_file_mb * 2**20,
                    "open_files": self.config.max_open_files,
                    "cpu": self.config.cpu_time_limit,
                },
                "test_timeout": self.config.test_timeout,
                "sys_path": self._info["site"] if self.config.site_packages else [],
            }
            env = self._sandbox_env(workdir if backend == "subprocess" else _WORKDIR_IN_SANDBOX)
            try:
                proc = subprocess.Popen(
                    self._command(backend, workdir),
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.PIPE,
                    cwd=workdir,
                    env=env if backend == "subprocess" else {"PATH": _SAFE_PATH},
                    start_new_session=True,
                    close_fds=True,
                )
            except OSError as error:
                return {"error": f"cannot start the sandbox: {error}"}
            try:
                out, err = proc.communicate(json.dumps(job).encode(), timeout=timeout)
            except subprocess.TimeoutExpired:
                _kill_group(proc.pid)
                out, err = proc.communicate()
                return {"error": "timeout", "partial": _last_json(out)}
            finally:
                _kill_group(proc.pid)
            answer = _last_json(out)
            if answer is None:
                return {
                    "error": f"the sandbox exited with status {proc.returncode}: {err.decode(errors='replace')[-800:]}"
                }
            return answer
        finally:
            shutil.rmtree(workdir, ignore_errors=True)

    def run_program(self, program: Program) -> ProgramResult:
        """Run one program's tests (each in its own process); never raises for anything the solution does."""
        if not program.tests:
            return ProgramResult([], "no tests")
        if program.solution is None:
            return ProgramResult(["no_code"] * len(program.tests), "no ```python block")
        slot = self._slots.get()
        try:
            start = time.monotonic()
            job = {
                "solution": program.solution,
                "tests": program.tests,
                "entry_point": program.entry_point,
                "deadline": self.config.timeout,
            }
            answer = self._run_job(job, self.backend, slot, timeout=self.config.timeout + 10.0)
        finally:
            self._slots.put(slot)
        statuses = answer.get("statuses")
        if statuses is None:
            error = answer.get("error", "")
            if error.startswith("cannot start"):
                raise SandboxUnavailableError(f"The '{self.backend}' sandbox {error}")
            # The harness gave no answer: out of time, or killed by the solution itself (it may signal the harness,
            # which runs as the same user). The tests fail ('error'); the reward function logs how many.
            partial = (answer.get("partial") or {}).get("statuses") or []
            missing = len(program.tests) - len(partial)
            statuses = list(partial) + ["timeout" if error == "timeout" else "error"] * missing
            return ProgramResult(statuses, f"{error} after {time.monotonic() - start:.1f} s")
        return ProgramResult(list(statuses), answer.get("detail", ""))

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


def _kill_group(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


def _last_json(out: bytes | None):
    for line in reversed((out or b"").decode(errors="replace").splitlines()):
        if line.startswith("{"):
            try:
                return json.loads(line)
            except ValueError:
                return None
    return None
