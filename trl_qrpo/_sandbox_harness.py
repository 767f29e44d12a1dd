"""The harness of the code sandbox: the trusted code that runs inside a sandbox, around the untrusted tests.

Started by `trl_qrpo.sandbox.CodeSandbox` as `python -I -S _sandbox_harness.py`, it reads one job (JSON) on stdin,
sets up the isolation that the backend leaves to it (namespaces and read-only remounts for the `subprocess` backend,
resource limits and the switch to an unprivileged user for both), forks one process per test, and writes one JSON
line on stdout. It imports only light standard-library modules, as it starts once per solution.
"""

import json
import os
import signal
import sys
import time

ISOLATION_KEYS = (
    "network",
    "read_only_fs",
    "host_files_hidden",
    "environment",
    "pid_namespace",
    "unprivileged",
    "process_limit",
    "resource_limits",
)
SANDBOX_ENV = ("PATH", "HOME", "TMPDIR", "LANG", "PYTHONHASHSEED", "PWD")


_CLONE_NEWNS, _CLONE_NEWUTS, _CLONE_NEWIPC, _CLONE_NEWPID, _CLONE_NEWNET = (
    0x00020000,
    0x04000000,
    0x08000000,
    0x20000000,
    0x40000000,
)
_MS_RDONLY, _MS_NOSUID, _MS_NODEV, _MS_NOEXEC, _MS_REMOUNT, _MS_BIND, _MS_REC, _MS_PRIVATE = (
    1,
    2,
    4,
    8,
    32,
    4096,
    16384,
    1 << 18,
)
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 24, 38
_CLONE_NEWUSER = 0x10000000


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc, option: int, value: int) -> bool:
    return libc.prctl(option, value, 0, 0, 0) == 0


def _mount(libc, source, target, fstype, flags) -> bool:
    def enc(s):
        return None if s is None else s.encode()

    return libc.mount(enc(source), enc(target), enc(fstype), flags, None) == 0


def _unescape(field: str) -> str:
    """A mountinfo path: spaces, tabs, newlines and backslashes are written as 3-digit octal escapes."""
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and field[i + 1 : i + 4].isdigit():
            out.append(chr(int(field[i + 1 : i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def _mount_points() -> list[tuple[str, set]]:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = _unescape(parts[4])
            points.append((point, set(parts[5].split(","))))
    return points


def _read_only_root(libc, workdir: str) -> bool:
    """In a new mount namespace: every mount read-only except `workdir`; True when / and every mount are."""
    if not _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE):
        return False
    if not _mount(libc, workdir, workdir, None, _MS_BIND):
        return False
    ok = True
    for point, options in reversed(_mount_points()):
        if point == workdir or point.startswith("/proc"):
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= (_MS_NOSUID if "nosuid" in options else 0) | (_MS_NODEV if "nodev" in options else 0)
        flags |= _MS_NOEXEC if "noexec" in options else 0
        if not _mount(libc, None, point, None, flags):
            ok = ok and point != "/" and not os.access(point, os.W_OK)
    return ok


def _user_namespace(libc, flags: int) -> bool:
    """unshare(2) a user namespace with `flags`, mapping our user and group ids to themselves."""
    uid, gid = os.geteuid(), os.getegid()
    if libc.unshare(_CLONE_NEWUSER | flags) != 0:
        return False
    try:
        for name, text in (("setgroups", "deny"), ("uid_map", f"{uid} {uid} 1"), ("gid_map", f"{gid} {gid} 1")):
            with open(f"/proc/self/{name}", "w") as f:
                f.write(text)
    except OSError:
        return False
    return True


def _drop_capabilities(libc) -> bool:
    """Drop every capability (those a user namespace gives its creator), for good: capset(2) to empty sets."""
    import ctypes

    header = (ctypes.c_uint32 * 2)(0x20080522, 0)  # _LINUX_CAPABILITY_VERSION_3, this thread
    data = (ctypes.c_uint32 * 6)()  # effective, permitted, inheritable x 2 words, all zero
    for cap in range(64):  # and the bounding set, so that nothing regains them
        libc.prctl(_PR_CAPBSET_DROP, cap, 0, 0, 0)
    return libc.capset(header, data) == 0


def _isolate(job: dict) -> tuple[dict, bool, str]:
    """Set up the sandbox around this process. Returns (isolation in force, in a new PID namespace, detail)."""
    import resource

    libc = _libc()
    iso = dict.fromkeys(ISOLATION_KEYS, False)
    iso["environment"] = not any(k not in SANDBOX_ENV for k in os.environ)
    detail = []
    pid_ns = user_ns = False
    workdir = job["workdir"]
    if job["backend"] == "bwrap":
        iso.update(network=True, read_only_fs=True, host_files_hidden=True)
        pid_ns = os.getpid() <= 2
    else:
        flags = _CLONE_NEWNET | _CLONE_NEWPID | _CLONE_NEWNS | _CLONE_NEWIPC | _CLONE_NEWUTS
        if os.geteuid() != 0 and _user_namespace(libc, flags):
            # not root: a user namespace of our own (our ids mapped to themselves) holds the other namespaces
            iso["network"], pid_ns, user_ns = True, True, True
        elif libc.unshare(flags) == 0:
            iso["network"], pid_ns = True, True
        elif libc.unshare(_CLONE_NEWNET) == 0:
            iso["network"] = True
            detail.append("unshare of the PID and mount namespaces refused")
        else:
            detail.append(f"unshare(2) refused (errno {__import__('ctypes').get_errno()}): no network namespace")
    if job["backend"] == "subprocess" and pid_ns:
        # The first child is PID 1 of the new namespace: it runs the tests; this process only waits for it.
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
        iso["read_only_fs"] = _read_only_root(libc, workdir)
        if not iso["read_only_fs"]:
            detail.append("read-only remount failed")
        if not _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC):
            detail.append("no fresh /proc")
        os.chdir(workdir)
        if user_ns and not _drop_capabilities(libc):
            detail.append("cannot drop the capabilities of the user namespace")
            iso["read_only_fs"] = False
    uid = job.get("uid")
    if uid is not None:
        # The untrusted code runs as `uid`; directories it cannot traverse (an interpreter under /root) are reached
        # through directory descriptors opened now.
        remapped, moved = [], {}
        for entry in sys.path + list(job.get("sys_path") or []):
            try:
                fd = os.open(entry, os.O_RDONLY | os.O_DIRECTORY)
            except OSError:
                continue
            remapped.append(f"/proc/self/fd/{fd}")
            moved[os.path.abspath(entry)] = remapped[-1]
        sys.path[:] = remapped
        sys.path_importer_cache.clear()
        # packages imported already (collections, encodings, ...) find their submodules through __path__
        for module in list(sys.modules.values()):
            path = getattr(module, "__path__", None)
            if isinstance(path, list):
                for i, entry in enumerate(path):
                    for old, new in moved.items():
                        if entry == old or entry.startswith(old + "/"):
                            path[i] = new + entry[len(old) :]
                            break
    else:
        sys.path.extend(job.get("sys_path") or [])
    limits = job["limits"]
    # RLIMIT_NPROC counts every process of the user: a cap per sandbox only when the sandbox has a user of its own
    # (a dedicated user id when the scorer is root, or bubblewrap's user namespace); otherwise it would count the
    # user's other processes, so it is left unset (and reported missing).
    own_user = uid is not None or user_ns or (job["backend"] == "bwrap" and os.geteuid() != 0)
    for name, value in (
        ("RLIMIT_AS", limits["memory"]),
        ("RLIMIT_NPROC", limits["processes"] if own_user else None),
        ("RLIMIT_FSIZE", limits["file_size"]),
        ("RLIMIT_NOFILE", limits["open_files"]),
        ("RLIMIT_CORE", 0),
    ):
        if value is not None:
            resource.setrlimit(getattr(resource, name), (value, value))
    iso["resource_limits"] = True
    if uid is not None:
        try:
            os.setgroups([])
            os.setgid(uid)
            os.setuid(uid)
        except OSError as error:
            detail.append(f"cannot switch to user id {uid}: {error}")
    iso["unprivileged"] = os.geteuid() != 0
    iso["process_limit"] = own_user and iso["unprivileged"]
    iso["pid_namespace"] = pid_ns
    _prctl(libc, _PR_SET_NO_NEW_PRIVS, 1)
    _prctl(libc, _PR_SET_DUMPABLE, 0)  # same-user processes cannot ptrace this one or open its /proc files
    if not pid_ns:
        detail.append("no PID namespace")
    return iso, pid_ns, "; ".join(detail)


def _run_test(solution, test: str, entry_point: str, cpu: int, nonce: bytes, write_fd: int, pid_ns: bool):
    """In the forked child: limits, then the untrusted code, then the token on success. Never returns."""
    import builtins
    import resource

    try:
        if not pid_ns:
            os.setpgid(0, 0)
        _prctl(_libc(), _PR_SET_PDEATHSIG, signal.SIGKILL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except BaseException:  # noqa: BLE001 (nothing may escape the child)
        os._exit(3)
    passed = False
    try:
        namespace = {"__name__": "solution", "__builtins__": builtins}
        exec(solution, namespace)  # noqa: S102 (running it is the point; this is the sandboxed child)
        exec(compile(test, "<test>", "exec", dont_inherit=True), namespace)  # noqa: S102
        candidate = eval(entry_point, namespace)
        namespace["check"](candidate)
        passed = True
    except BaseException:  # noqa: BLE001 (SystemExit, KeyboardInterrupt and the rest: the test fails)
        passed = False
    if passed:
        try:
            os.write(write_fd, nonce)
        except BaseException:  # noqa: BLE001
            os._exit(1)
        os._exit(0)
    os._exit(1)


def _wait(pid: int, timeout: float):
    """Exit status of `pid`, or None when it is still running after `timeout` seconds."""
    import select

    try:
        pidfd = os.pidfd_open(pid)
    except (AttributeError, OSError):
        pidfd = None
    end = time.monotonic() + timeout
    try:
        while True:
            done, status = os.waitpid(pid, os.WNOHANG)
            if done:
                return status
            left = end - time.monotonic()
            if left <= 0:
                return None
            if pidfd is not None:
                select.select([pidfd], [], [], left)
            else:
                time.sleep(min(0.01, left))
    finally:
        if pidfd is not None:
            os.close(pidfd)


def _kill_all(pid: int, pid_ns: bool) -> None:
    """Kill the test's process and everything it started."""
    if pid_ns and os.getpid() <= 2:  # PID 1 or 2 only exist for us inside a namespace of our own
        try:
            os.kill(-1, signal.SIGKILL)  # every process this one may signal in its own PID namespace, not itself
        except ProcessLookupError:
            pass
    else:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    try:
        os.waitpid(pid, 0)
    except ChildProcessError:
        pass
    if os.getpid() == 1:  # the namespace's init reaps the orphans
        while True:
            try:
                if os.waitpid(-1, os.WNOHANG)[0] == 0:
                    break
            except ChildProcessError:
                break


def _harness_main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    isolation, pid_ns, detail = _isolate(job)
    if job.get("probe"):
        out.write(json.dumps({"isolation": isolation, "detail": detail}) + "\n")
        out.flush()
        return
    statuses = []
    deadline = time.monotonic() + float(job["deadline"])
    try:
        solution = compile(job["solution"], "<solution>", "exec", dont_inherit=True)
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as error:
        statuses = ["syntax_error"] * len(job["tests"])
        out.write(json.dumps({"statuses": statuses, "detail": f"{type(error).__name__}: {error}"[:500]}) + "\n")
        out.flush()
        return
    cpu = int(job["limits"]["cpu"])
    for test in job["tests"]:
        left = deadline - time.monotonic()
        if left <= 0:
            statuses.append("timeout")
            continue
        nonce = os.urandom(16)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            out.close()
            _run_test(solution, test, job["entry_point"], cpu, nonce, write_fd, pid_ns)
        os.close(write_fd)
        if not pid_ns:
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
        status = _wait(pid, min(float(job["test_timeout"]), left))
        os.set_blocking(read_fd, False)
        try:
            token = os.read(read_fd, 64)
        except OSError:
            token = b""
        os.close(read_fd)
        _kill_all(pid, pid_ns)
        if status is None:
            statuses.append("timeout")
        elif token == nonce and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            statuses.append("passed")
        else:
            statuses.append("failed")
    out.write(json.dumps({"statuses": statuses, "detail": detail}) + "\n")
    out.flush()


if __name__ == "__main__":
    _harness_main()
