"""The harness of the code sandbox: the trusted code that runs inside the sandboxes, around the untrusted solution.

`trl_qrpo.sandbox.CodeSandbox` starts two sandboxes per solution, each as `python -I -S _sandbox_harness.py`, each
reading one job (JSON) on stdin, joined by a unix socket pair that the scorer made:

- the **solution** sandbox (`role: solution`) gets the solution's code and its entry point, never a test. Its harness
  (PID 1 of its PID namespace where it has one) compiles the code, then, for each test, forks a fresh process that
  executes the solution and serves calls of the entry point on a socket of its own: arguments come in, the return
  value goes back, both as plain data (the codec below: no pickle, no eval). After each test every process of the
  sandbox but the harness is killed.
- the **test** sandbox (`role: test`) gets the tests and the dataset's header (its `imports` column), never the
  solution. For each test it forks a process that executes the header and the test module, and calls
  `check(candidate)` with `candidate` a proxy that sends each call to the solution side. The verdict (a pipe, the
  exit status) stays in this sandbox, whose interpreter no solution code has touched; this harness writes the
  statuses as one JSON line on stdout, which only the scorer reads.

Both harnesses set up what the backend leaves to them (namespaces, a size-limited tmpfs and read-only remounts for
the `subprocess` backend; resource limits, a seccomp filter against new user namespaces and the switch to an
unprivileged user for both). The harness imports only light standard-library modules, as it starts twice per
solution.
"""

import json
import os
import signal
import socket
import struct
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
    "no_user_namespaces",
    "no_host_sockets",
    "write_quota",
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
_PR_SET_PDEATHSIG, _PR_SET_DUMPABLE, _PR_SET_SECCOMP, _PR_CAPBSET_DROP, _PR_SET_NO_NEW_PRIVS = 1, 4, 22, 24, 38
_CLONE_NEWUSER = 0x10000000


def _libc():
    import ctypes

    return ctypes.CDLL(None, use_errno=True)


def _prctl(libc, option: int, value: int) -> bool:
    return libc.prctl(option, value, 0, 0, 0) == 0


def _mount(libc, source, target, fstype, flags, data=None) -> bool:
    def enc(s):
        return None if s is None else s.encode()

    return libc.mount(enc(source), enc(target), enc(fstype), flags, enc(data)) == 0


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


def _mount_points() -> list:
    points = []
    with open("/proc/self/mountinfo") as f:
        for line in f:
            parts = line.split()
            point = _unescape(parts[4])
            points.append((point, set(parts[5].split(","))))
    return points


def _read_only_root(libc, workdir: str, quota: int, hide: list) -> tuple:
    """In a new mount namespace: every mount read-only except `workdir`, which becomes a tmpfs of `quota` bytes;
    `hide` (directories) covered by empty read-only tmpfs. Returns (read-only, tmpfs in place)."""
    if not _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE):
        return False, False
    tmpfs = _mount(libc, "tmpfs", workdir, "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={quota},mode=1777")
    if not tmpfs and not _mount(libc, workdir, workdir, None, _MS_BIND):
        return False, False
    for path in hide:
        if os.path.isdir(path):
            _mount(libc, "tmpfs", path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "size=4096,mode=755")
    ok = True
    for point, options in reversed(_mount_points()):
        if point == workdir or point.startswith("/proc"):
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= (_MS_NOSUID if "nosuid" in options else 0) | (_MS_NODEV if "nodev" in options else 0)
        flags |= _MS_NOEXEC if "noexec" in options else 0
        if not _mount(libc, None, point, None, flags):
            ok = ok and point != "/" and not os.access(point, os.W_OK)
    return ok, tmpfs


_PIVOT_ROOT = {"x86_64": 155, "aarch64": 41}
_MNT_DETACH = 2


def _minimal_root(libc, job: dict) -> tuple:
    """In a new mount namespace, the root bubblewrap would build: a read-only tmpfs holding read-only binds of the
    system directories and of the interpreter (its site-packages covered), a few devices, a fresh /proc, and a tmpfs
    of the job's quota at /sandbox, the only writable place; then pivot_root(2) into it, so that nothing else of the
    host is reachable. Returns (done, tmpfs in place); not done: nothing changed that matters (the caller falls back).
    """
    nr = _PIVOT_ROOT.get(os.uname().machine)
    new = job["workdir"]
    if nr is None or not _mount(libc, None, "/", None, _MS_REC | _MS_PRIVATE):
        return False, False
    if not _mount(libc, "tmpfs", new, "tmpfs", _MS_NOSUID | _MS_NODEV, "size=1m,mode=755"):
        return False, False
    try:
        for source in job.get("binds") or []:
            target = new + source
            if os.path.isdir(source):
                os.makedirs(target, exist_ok=True)
            elif os.path.exists(source):
                os.makedirs(os.path.dirname(target), exist_ok=True)
                open(target, "a").close()
            else:
                continue
            if not _mount(libc, source, target, None, _MS_BIND | _MS_REC):
                raise OSError(f"bind of {source}")
        for link_target, path in job.get("symlinks") or []:
            os.makedirs(os.path.dirname(new + path), exist_ok=True)
            os.symlink(link_target, new + path)
        for path in job.get("hide") or []:
            if os.path.isdir(new + path):
                _mount(libc, "tmpfs", new + path, "tmpfs", _MS_NOSUID | _MS_NODEV | _MS_RDONLY, "size=4096,mode=755")
        os.makedirs(new + "/dev", exist_ok=True)
        for device in ("null", "zero", "full", "random", "urandom"):
            open(new + "/dev/" + device, "a").close()
            if not _mount(libc, "/dev/" + device, new + "/dev/" + device, None, _MS_BIND):
                raise OSError(f"bind of /dev/{device}")
        for path in ("/proc", "/sandbox", "/tmp"):
            os.makedirs(new + path, exist_ok=True)
        quota = int(job["limits"]["disk"])
        tmpfs = _mount(libc, "tmpfs", new + "/sandbox", "tmpfs", _MS_NOSUID | _MS_NODEV, f"size={quota},mode=1777")
        if not tmpfs:
            raise OSError("tmpfs")
        # /proc of our PID namespace, mounted while the host's is still visible (a user namespace may mount proc
        # only then)
        proc = _mount(libc, "proc", new + "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC)
        os.chdir(new)
        if libc.syscall(nr, b".", b".") != 0 or libc.umount2(b".", _MNT_DETACH) != 0:
            raise OSError("pivot_root")
    except OSError:
        os.chdir("/")
        libc.umount2(new.encode(), _MNT_DETACH)
        return False, False
    os.chdir("/")
    if not proc:
        return False, True  # no way back after pivot_root: the caller reports what is missing
    ok = True
    for point, options in reversed(_mount_points()):
        if point == "/sandbox" or point.startswith("/proc"):
            continue
        flags = _MS_REMOUNT | _MS_BIND | _MS_RDONLY
        flags |= (_MS_NOSUID if "nosuid" in options else 0) | (_MS_NODEV if "nodev" in options else 0)
        flags |= _MS_NOEXEC if "noexec" in options else 0
        if not _mount(libc, None, point, None, flags):
            ok = ok and point != "/" and not os.access(point, os.W_OK)
    os.environ["HOME"] = os.environ["TMPDIR"] = "/sandbox"
    return ok, True


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


# seccomp: no new user namespaces (unshare / clone with CLONE_NEWUSER, setns refused; clone3, whose flags a filter
# cannot read, answers ENOSYS, and the C library falls back to clone), and no new unix-domain socket (a network
# namespace does not cover sockets bound to a path of the host's file system; socketpair(2) stays allowed).
# Syscall numbers per architecture.
_SECCOMP_ARCH = {
    "x86_64": (0xC000003E, {"unshare": 272, "clone": 56, "clone3": 435, "setns": 308, "socket": 41}),
    "aarch64": (0xC00000B7, {"unshare": 97, "clone": 220, "clone3": 435, "setns": 268, "socket": 198}),
}


def _seccomp_no_userns(libc) -> bool:
    import ctypes

    arch = _SECCOMP_ARCH.get(os.uname().machine)
    if arch is None:
        return False
    audit, nr = arch
    allow, eperm, enosys = 0x7FFF0000, 0x00050000 | 1, 0x00050000 | 38
    ld, jeq, jge, jset, ret = 0x20, 0x15, 0x35, 0x45, 0x06
    prog = [
        (ld, 0, 0, 4),  # arch
        (jeq, 1, 0, audit),
        (ret, 0, 0, eperm),  # another ABI (i386 on x86_64): refused outright
        (ld, 0, 0, 0),  # syscall number
        (jge, 0, 1, 0x40000000),  # x32 ABI
        (ret, 0, 0, eperm),
        (jeq, 0, 1, nr["clone3"]),
        (ret, 0, 0, enosys),
        (jeq, 0, 1, nr["setns"]),
        (ret, 0, 0, eperm),
        (jeq, 0, 4, nr["socket"]),
        (ld, 0, 0, 16),  # the domain
        (jeq, 0, 1, 1),  # AF_UNIX
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
        (jeq, 1, 0, nr["unshare"]),
        (jeq, 0, 3, nr["clone"]),
        (ld, 0, 0, 16),  # low 32 bits of the first argument: the flags
        (jset, 0, 1, _CLONE_NEWUSER),
        (ret, 0, 0, eperm),
        (ret, 0, 0, allow),
    ]

    class Filter(ctypes.Structure):
        _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]

    class Program(ctypes.Structure):
        _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(Filter))]

    filters = (Filter * len(prog))(*[Filter(*ins) for ins in prog])
    program = Program(len(prog), filters)
    return libc.prctl(_PR_SET_SECCOMP, 2, ctypes.byref(program), 0, 0) == 0


def _isolate(job: dict) -> tuple:
    """Set up the sandbox around this process. Returns (isolation in force, in a new PID namespace, detail)."""
    import resource

    libc = _libc()
    iso = dict.fromkeys(ISOLATION_KEYS, False)
    iso["environment"] = not any(k not in SANDBOX_ENV for k in os.environ)
    detail = []
    pid_ns = user_ns = False
    workdir = job["workdir"]
    if job["backend"] == "bwrap":
        iso.update(network=True, read_only_fs=True, host_files_hidden=True, write_quota=True)
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
        # The first child is PID 1 of the new namespace: it runs the role; this process only waits for it.
        child = os.fork()
        if child:
            _, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
        _prctl(libc, _PR_SET_PDEATHSIG, signal.SIGKILL)
        hidden, pivoted = _minimal_root(libc, job)
        if pivoted and not hidden:
            detail.append("the minimal root is incomplete (no /proc, or a mount stayed writable)")
            iso["host_files_hidden"] = iso["write_quota"] = True
            workdir = "/sandbox"
        elif hidden:
            iso["read_only_fs"] = iso["host_files_hidden"] = iso["write_quota"] = True
            workdir = "/sandbox"
        else:
            detail.append("no minimal root (pivot_root refused): host files stay readable")
            iso["read_only_fs"], iso["write_quota"] = _read_only_root(
                libc, workdir, int(job["limits"]["disk"]), list(job.get("hide") or [])
            )
        if not iso["read_only_fs"]:
            detail.append("read-only remount failed")
        if not hidden and not _mount(libc, "proc", "/proc", "proc", _MS_NOSUID | _MS_NODEV | _MS_NOEXEC):
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
    iso["no_user_namespaces"] = iso["no_host_sockets"] = _seccomp_no_userns(libc)
    if not iso["no_user_namespaces"]:
        detail.append("no seccomp filter against user namespaces and unix sockets")
    if not pid_ns:
        detail.append("no PID namespace")
    if not iso["write_quota"]:
        detail.append("no size-limited tmpfs for the work directory")
    return iso, pid_ns, "; ".join(detail)


# ----------------------------------------------------------------------------------------------------------------
# The value codec: plain data only, exact types, no pickle, no eval
# ----------------------------------------------------------------------------------------------------------------
#
# A value is sent as a flat list of nodes in post-order: every node's children are nodes before it (by index), the
# last node is the value. So decoding is one loop (no recursion: depth costs nothing and cannot overflow), a cycle
# cannot be expressed, and shared sub-values stay shared. Nodes:
#   ["n"] None   ["b", bool]   ["i", hex]   ["f", float.hex]   ["c", re.hex, im.hex]   ["s", str]   ["y", hex bytes]
#   ["l", [i...]] list   ["t", [i...]] tuple   ["S", [i...]] set   ["F", [i...]] frozenset   ["d", [k, v, k, v...]]
#   ["o", class name, [field name, i, ...]]   an object of one of the dataset's helper classes (ListNode, TreeNode)


class CodecError(ValueError):
    """A value that is not plain data, or too large."""


# Containers nested deeper than this are refused (hashing a deep tuple recurses in C); objects of helper classes do
# not count (a linked list of 100,000 ListNodes crosses).
MAX_DEPTH = 10_000
DICT_LIKE = "<dict>"  # what object_class returns for a mapping sent as the dict it equals


_SCALARS = (type(None), bool, int, float, complex, str, bytes)


def encode_value(value, object_class, max_nodes: int, max_bytes: int) -> list:
    """The nodes of `value`. `object_class(obj)` returns the helper-class name of `obj` (field-wise encoded) or None.

    Only exact built-in types are plain data (`type(x) is int`, never a subclass); anything else raises CodecError.
    """
    nodes, done, active = [], {}, set()
    size = 0
    stack = [[value, None, None, 0, []]]  # object, kind, children, next child, child node indices
    result = None
    while stack:
        frame = stack[-1]
        obj = frame[0]
        if frame[2] is None:
            kind = type(obj)
            node = None
            if obj is None:
                node = ["n"]
            elif kind is bool:
                node = ["b", obj]
            elif kind is int:
                node = ["i", format(obj, "x")]
                size += len(node[1])
            elif kind is float:
                node = ["f", obj.hex()]
            elif kind is complex:
                node = ["c", obj.real.hex(), obj.imag.hex()]
            elif kind is str:
                node = ["s", obj]
                size += len(obj)
            elif kind is bytes:
                node = ["y", obj.hex()]
                size += 2 * len(obj)
            else:
                key = id(obj)
                if key in done:
                    index = done[key]
                    stack.pop()
                    if stack:
                        stack[-1][4].append(index)
                    else:
                        result = index
                    continue
                if key in active:
                    raise CodecError("a cyclic value (it contains itself)")
                if kind is list or kind is tuple or kind is set or kind is frozenset:
                    frame[1] = {list: "l", tuple: "t", set: "S", frozenset: "F"}[kind]
                    frame[2] = list(obj)
                elif kind is dict:
                    frame[1] = "d"
                    frame[2] = [x for item in list(obj.items()) for x in item]
                else:
                    name = object_class(obj)
                    if name is None:
                        raise CodecError(f"a value of type {kind.__name__!r}, which is not plain data")
                    if name == DICT_LIKE:
                        frame[1] = "d"
                        frame[2] = [x for item in list(dict.items(obj)) for x in item]
                        active.add(key)
                        size += len(frame[2])
                        if size > max_bytes:
                            raise CodecError(f"a value larger than {max_bytes} bytes")
                        continue
                    fields = vars(obj)
                    if type(fields) is not dict:
                        raise CodecError(f"an object of {name!r} without plain fields")
                    items = list(fields.items())
                    frame[1] = ("o", name, [k for k, _ in items])
                    frame[2] = [v for _, v in items]
                active.add(key)
                size += len(frame[2])
                if size > max_bytes:
                    raise CodecError(f"a value larger than {max_bytes} bytes")
                continue
            if size > max_bytes:
                raise CodecError(f"a value larger than {max_bytes} bytes")
            nodes.append(node)
            index = len(nodes) - 1
            stack.pop()
            if stack:
                stack[-1][4].append(index)
            else:
                result = index
        elif frame[3] < len(frame[2]):
            child = frame[2][frame[3]]
            frame[3] += 1
            stack.append([child, None, None, 0, []])
        else:
            kind, kids = frame[1], frame[4]
            if isinstance(kind, tuple):
                names = kind[2]
                if any(type(n) is not str for n in names):
                    raise CodecError(f"an object of {kind[1]!r} with a field name that is not a string")
                node = ["o", kind[1], [x for pair in zip(names, kids) for x in pair]]
            else:
                node = [kind, kids]
            nodes.append(node)
            index = len(nodes) - 1
            done[id(obj)] = index
            active.discard(id(obj))
            stack.pop()
            if stack:
                stack[-1][4].append(index)
            else:
                result = index
        if len(nodes) > max_nodes:
            raise CodecError(f"a value of more than {max_nodes} parts")
    assert result == len(nodes) - 1
    return nodes


def decode_value(nodes, make_object, max_nodes: int):
    """The value of `nodes` (see `encode_value`), built afresh from exact built-in types.

    `make_object(name, fields)` builds an object of a helper class (or raises CodecError). Anything malformed raises
    CodecError."""
    try:
        if type(nodes) is not list or not nodes or len(nodes) > max_nodes:
            raise CodecError("no value, or one of too many parts")
        built, depth = [], []
        for i, node in enumerate(nodes):
            if type(node) is not list or not node or type(node[0]) is not str:
                raise CodecError("a malformed value")
            tag = node[0]
            arg = node[1] if len(node) > 1 else None
            if tag in ("l", "t", "S", "F", "d", "o"):
                kids = node[1] if tag != "o" else node[2]
                if type(kids) is not list:
                    raise CodecError("a malformed value")
                pairs = kids if tag == "o" else None
                refs = kids[1::2] if tag == "o" else kids
                for k in refs:
                    if type(k) is not int or not 0 <= k < i:
                        raise CodecError("a malformed value")
                items = [built[k] for k in refs]
                level = max((depth[k] for k in refs), default=0) + (tag != "o")
                if level > MAX_DEPTH:
                    raise CodecError(f"a value nested more than {MAX_DEPTH} levels deep")
            else:
                level = 0
            if tag == "n" and len(node) == 1:
                value = None
            elif tag == "b" and type(arg) is bool:
                value = arg
            elif tag == "i" and type(arg) is str:
                value = int(arg, 16)
            elif tag == "f" and type(arg) is str:
                value = float.fromhex(arg)
            elif tag == "c" and len(node) == 3 and type(arg) is str and type(node[2]) is str:
                value = complex(float.fromhex(arg), float.fromhex(node[2]))
            elif tag == "s" and type(arg) is str:
                value = arg
            elif tag == "y" and type(arg) is str:
                value = bytes.fromhex(arg)
            elif tag == "l":
                value = items
            elif tag == "t":
                value = tuple(items)
            elif tag == "S":
                value = set(items)
            elif tag == "F":
                value = frozenset(items)
            elif tag == "d":
                if len(items) % 2:
                    raise CodecError("a malformed value")
                value = dict(zip(items[0::2], items[1::2]))
            elif tag == "o" and type(arg) is str and len(pairs) % 2 == 0:
                names = pairs[0::2]
                for name in names:
                    if type(name) is not str or not name.isidentifier() or name.startswith("__"):
                        raise CodecError("an object with a malformed field name")
                value = make_object(arg, list(zip(names, items)))
            else:
                raise CodecError(f"a malformed value (tag {tag[:10]!r})")
            built.append(value)
            depth.append(level)
        return built[-1]
    except CodecError:
        raise
    except Exception as error:  # unhashable set members, bad hex, ...: malformed
        raise CodecError(f"a malformed value ({type(error).__name__})") from None


def _send(sock, message: dict) -> None:
    data = json.dumps(message, separators=(",", ":")).encode("utf-8", "surrogatepass")
    sock.sendall(struct.pack(">I", len(data)) + data)


def _recv_exact(sock, n: int) -> bytes:
    chunks, left = [], n
    while left:
        chunk = sock.recv(min(left, 1 << 20))
        if not chunk:
            raise EOFError("the other side closed the connection")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def _recv(sock, max_bytes: int) -> dict:
    (length,) = struct.unpack(">I", _recv_exact(sock, 4))
    if length > max_bytes:
        raise CodecError(f"a message of {length} bytes (limit {max_bytes})")
    data = _recv_exact(sock, length)
    try:
        message = json.loads(data.decode("utf-8", "surrogatepass"))
    except (ValueError, RecursionError, MemoryError):
        raise CodecError("a malformed message") from None
    if type(message) is not dict:
        raise CodecError("a malformed message")
    return message


# ----------------------------------------------------------------------------------------------------------------
# The solution side (untrusted code runs here; this side never sees a test)
# ----------------------------------------------------------------------------------------------------------------

_DICT_SUBCLASSES = ("Counter", "OrderedDict", "defaultdict")


def _solution_object_class(obj):
    """How the solution side sends a value that is not of a built-in type: an instance of a class the solution's
    module defined, field by field (by its class's name); a Counter, OrderedDict or defaultdict as the dict it
    equals in Python; anything else not at all (None)."""
    import collections

    kind = type(obj)
    if kind in (collections.Counter, collections.OrderedDict, collections.defaultdict):
        return DICT_LIKE
    if getattr(kind, "__module__", None) == "solution" and isinstance(getattr(obj, "__dict__", None), dict):
        return kind.__name__
    return None


def _serve_calls(sock, namespace, entry, limits) -> None:
    """In the solution's process: answer calls until the test side closes the socket."""
    import builtins

    max_bytes, max_nodes = limits["value_bytes"], limits["value_nodes"]

    def make_object(name, fields):
        cls = namespace.get(name)
        if not isinstance(cls, type):
            cls = type(name, (), {})
        obj = object.__new__(cls)
        for key, value in fields:
            object.__setattr__(obj, key, value)
        return obj

    functions = {"": entry}
    while True:
        try:
            message = _recv(sock, max_bytes)
        except BaseException:  # noqa: BLE001 (closed, or garbage: nothing more to serve)
            os._exit(0)
        op = message.get("op")
        if op == "bind":
            found = []
            for name in message.get("names") or []:
                if type(name) is str and callable(namespace.get(name)):
                    functions[name] = namespace[name]
                    found.append(name)
            _send(sock, {"bound": found})
            continue
        try:
            function = functions[message["fn"]]
            args, kwargs = decode_value(message["v"], make_object, max_nodes)
        except BaseException as error:  # noqa: BLE001
            _send(sock, {"bad": f"arguments: {type(error).__name__}"})
            continue
        try:
            result = function(*args, **kwargs)
        except Exception as error:  # the solution raised: the test may expect it
            name = type(error).__name__
            try:
                text = str(error)[:200]
            except BaseException:  # noqa: BLE001
                text = ""
            _send(sock, {"raised": name if isinstance(getattr(builtins, name, None), type) else "", "text": text})
            continue
        except BaseException as error:  # noqa: BLE001 (SystemExit, ...: the call fails)
            _send(sock, {"bad": f"the solution ended the call: {type(error).__name__}"})
            continue
        try:
            nodes = encode_value(result, _solution_object_class, max_nodes, max_bytes)
            _send(sock, {"v": nodes})
        except BaseException as error:  # noqa: BLE001
            reason = str(error)[:200] if isinstance(error, CodecError) else type(error).__name__
            _send(sock, {"bad": f"the return value: {reason}"})


def _start_test_process(pid_ns: bool, cpu_seconds) -> None:
    """What both per-test forks do first: their own process group (without a PID namespace), killed with their
    parent, no standard streams, the test's CPU limit. Exits the process (status 3) if any of it fails."""
    import resource

    try:
        if not pid_ns:
            os.setpgid(0, 0)
        _prctl(_libc(), _PR_SET_PDEATHSIG, signal.SIGKILL)
        devnull = os.open(os.devnull, os.O_RDWR)
        for fd in (0, 1, 2):
            os.dup2(devnull, fd)
        cpu = int(cpu_seconds)
        resource.setrlimit(resource.RLIMIT_CPU, (cpu, cpu + 1))
    except BaseException:  # noqa: BLE001 (nothing may escape the child)
        os._exit(3)


def _solution_child(code, entry_point: str, sock, limits: dict, pid_ns: bool) -> None:
    """Forked per test: executes the solution afresh, then serves calls. Never returns."""
    import builtins

    _start_test_process(pid_ns, limits["cpu"])
    try:
        namespace = {"__name__": "solution", "__builtins__": builtins}
        exec(code, namespace)  # noqa: S102 (running it is the point; this is the sandboxed child)
        entry = eval(entry_point, namespace)  # the dataset's expression, e.g. Solution().twoSum
        ready = callable(entry)
    except BaseException:  # noqa: BLE001
        ready = False
    try:
        _send(sock, {"ready": ready})
        if ready:
            _serve_calls(sock, namespace, entry, limits)
    except BaseException:  # noqa: BLE001
        pass
    os._exit(0)


def _kill_all(pid, pid_ns: bool) -> None:
    """Kill a forked process and everything it started (every process of the namespace but this one, PID 1 or 2)."""
    if pid_ns and os.getpid() <= 2:
        try:
            os.kill(-1, signal.SIGKILL)
        except ProcessLookupError:
            pass
    elif pid is not None:
        try:
            os.killpg(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
    if pid is not None:
        try:
            os.waitpid(pid, 0)
        except ChildProcessError:
            pass
    if os.getpid() == 1:  # the namespace's init reaps the orphans (all dead or dying: SIGKILL)
        while True:
            try:
                os.waitpid(-1, 0)
            except ChildProcessError:
                break
            except InterruptedError:
                continue


def _solution_main(job: dict, pid_ns: bool) -> None:
    ctl = socket.socket(fileno=int(job["ctl_fd"]))
    try:
        code = compile(job["solution"], "<solution>", "exec", dont_inherit=True)
        hello = {"ok": True}
    except (SyntaxError, ValueError, RecursionError, MemoryError, OverflowError) as error:
        code, hello = None, {"syntax_error": f"{type(error).__name__}: {error}"[:500]}
    job["solution"] = None
    ctl.send(json.dumps(hello).encode())
    if code is None:
        return
    child = None
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(ctl, 4096, 4)
        except OSError:
            break
        if not message:
            break
        if child is not None:
            _kill_all(child, pid_ns)
            child = None
        if message[:1] == b"B" and len(fds) == 1:
            pid = os.fork()
            if pid == 0:
                ctl.close()
                _solution_child(code, job["entry_point"], socket.socket(fileno=fds[0]), job["limits"], pid_ns)
            child = pid
            if not pid_ns:
                try:
                    os.setpgid(pid, pid)
                except OSError:
                    pass
        for fd in fds:
            os.close(fd)
    if child is not None:
        _kill_all(child, pid_ns)


# ----------------------------------------------------------------------------------------------------------------
# The test side (trusted: no solution code ever runs in this sandbox)
# ----------------------------------------------------------------------------------------------------------------


class SolutionFailed(BaseException):
    """A call of the solution that crashed, timed out, exited or returned something that is not plain data.

    A BaseException, so that a test's `except Exception` does not swallow it; the test fails whatever `check` does.
    """


class SolutionError(Exception):
    """The solution raised an exception that is not one of Python's built-in exceptions (or is one that steers
    control flow: StopIteration, StopAsyncIteration)."""


_CONTROL_FLOW = (StopIteration, StopAsyncIteration)


def _free_names(source: str) -> set:
    """Names a module reads that it never binds (nor any of its functions' parameters): those it expects from
    elsewhere (the header, the solution's module, the built-ins)."""
    import ast

    loaded, bound = set(), set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Name):
            (loaded if isinstance(node.ctx, ast.Load) else bound).add(node.id)
        elif isinstance(node, ast.arg):
            bound.add(node.arg)
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            bound.add(node.name)
        elif isinstance(node, ast.alias):
            bound.add((node.asname or node.name).split(".")[0])
    return loaded - bound


def _test_child(job: dict, test: str, sock, nonce: bytes, write_fd: int, pid_ns: bool) -> None:
    """Forked per test: header and test module, then check(proxy); the token on success. Never returns."""
    import builtins

    _start_test_process(pid_ns, job["limits"]["cpu"])
    limits = job["limits"]
    max_bytes, max_nodes = limits["value_bytes"], limits["value_nodes"]
    failures = []

    try:
        namespace = job["namespace"]  # the header, executed once by the parent (this process has its own copy)
        if namespace is None:
            raise RuntimeError("the header failed")
        module = compile(test, "<test>", "exec", dont_inherit=True)
        exec(module, namespace)  # noqa: S102 (the dataset's test: trusted, and sandboxed all the same)
        helpers = {
            name: value
            for name, value in namespace.items()
            if isinstance(value, type) and value.__module__ == "solution"
        }
        helper_names = {cls: name for name, cls in helpers.items()}

        def object_class(obj):
            return helper_names.get(type(obj))

        def make_object(name, fields):
            cls = helpers.get(name)
            if cls is None:
                raise CodecError(f"an object of class {name!r}, not one of the dataset's")
            obj = object.__new__(cls)
            for key, value in fields:
                object.__setattr__(obj, key, value)
            return obj

        def fail(reason):
            failures.append(reason)
            raise SolutionFailed(reason)

        class Remote:
            """A function of the solution, called across the sandboxes (arguments and result as plain data)."""

            __slots__ = ("_name",)

            def __init__(self, name):
                self._name = name

            def __call__(self, *args, **kwargs):
                if failures:
                    raise SolutionFailed(failures[0])
                try:
                    nodes = encode_value((list(args), dict(kwargs)), object_class, max_nodes, max_bytes)
                except CodecError as error:
                    fail(f"arguments the sandbox cannot send: {error}")
                try:
                    _send(sock, {"op": "call", "fn": self._name, "v": nodes})
                    reply = _recv(sock, max_bytes)
                except (OSError, EOFError, CodecError, struct.error) as error:
                    fail(f"the solution's process ended or answered garbage: {error}")
                if "v" in reply:
                    try:
                        return decode_value(reply["v"], make_object, max_nodes)
                    except CodecError as error:
                        fail(f"return value: {error}")
                if "raised" in reply:
                    name, text = reply.get("raised"), reply.get("text")
                    text = text if type(text) is str else ""
                    cls = getattr(builtins, name, None) if type(name) is str and name else None
                    # StopIteration would end the iteration that called candidate (all(map(candidate, ...)) == True)
                    if isinstance(cls, type) and issubclass(cls, Exception) and cls not in _CONTROL_FLOW:
                        try:
                            error = cls(text)
                        except Exception:  # noqa: BLE001 (UnicodeDecodeError and others need more arguments)
                            error = SolutionError(f"{name}: {text}")
                        raise error
                    raise SolutionError(text)
                fail(str(reply.get("bad"))[:200])

            def __repr__(self):
                return f"<solution function {self._name or 'entry point'}>"

        hello = _recv(sock, 4096)
        if hello.get("ready") is not True:
            os._exit(1)
        wanted = sorted(n for n in _free_names(test) if n not in namespace and not hasattr(builtins, n))
        if wanted:
            # names the test takes from the solution's module (HumanEval/32's `poly` when the header is not given)
            _send(sock, {"op": "bind", "names": wanted})
            bound = _recv(sock, max_bytes).get("bound") or []
            for name in bound:
                if type(name) is str and name in wanted:
                    namespace[name] = Remote(name)
        namespace["check"](Remote(""))
        passed = not failures
        reason = failures[0] if failures else ""
    except BaseException as error:  # noqa: BLE001 (a failed assert, an error of the test, a failed call: fails)
        passed = False
        try:
            reason = failures[0] if failures else f"{type(error).__name__}: {error}"
        except BaseException:  # noqa: BLE001
            reason = type(error).__name__
    if not passed:
        try:
            os.write(write_fd, b"F" + reason.encode("utf-8", "replace")[:300])
        except BaseException:  # noqa: BLE001
            pass
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


def _ctl_recv(ctl, timeout: float):
    import select

    ready, _, _ = select.select([ctl], [], [], max(0.0, timeout))
    if not ready:
        return None
    try:
        return ctl.recv(4096) or None
    except OSError:
        return None


def _test_main(job: dict, pid_ns: bool, out) -> None:
    ctl = socket.socket(fileno=int(job["ctl_fd"]))
    tests = job["tests"]
    deadline = time.monotonic() + float(job["deadline"])
    hello_raw = _ctl_recv(ctl, deadline - time.monotonic())
    try:
        hello = json.loads(hello_raw) if hello_raw else {}
    except ValueError:
        hello = {}
    if type(hello) is not dict:
        hello = {}
    if "syntax_error" in hello:
        detail = hello["syntax_error"] if type(hello["syntax_error"]) is str else ""
        out.write(json.dumps({"statuses": ["syntax_error"] * len(tests), "detail": detail[:500]}) + "\n")
        return
    if hello.get("ok") is not True:
        answer = {"statuses": ["error"] * len(tests), "detail": "the solution's sandbox did not start"}
        out.write(json.dumps(answer) + "\n")
        return
    statuses = []
    server_alive = True
    first_failure = ""
    import ast  # noqa: F401 (imported once here, not in every forked test)
    import builtins
    import resource  # noqa: F401

    # The dataset's header (LeetCode's imports and helper classes): executed once, here; every forked test starts
    # from a copy of its namespace.
    namespace = {"__name__": "solution", "__builtins__": builtins}
    try:
        if job.get("header"):
            exec(compile(job["header"], "<header>", "exec", dont_inherit=True), namespace)  # noqa: S102
    except BaseException as error:  # noqa: BLE001
        namespace = None
        first_failure = f"the header raised {type(error).__name__}: {error}"[:300]
    job["namespace"] = namespace

    for test in tests:
        left = deadline - time.monotonic()
        if left <= 0:
            statuses.append("timeout")
            continue
        if not server_alive:
            statuses.append("failed")
            continue
        mine, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            socket.send_fds(ctl, [b"B"], [theirs.fileno()])
        except OSError:
            server_alive = False
        theirs.close()
        if not server_alive:
            mine.close()
            statuses.append("failed")
            continue
        nonce = os.urandom(16)
        read_fd, write_fd = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.close(read_fd)
            ctl.close()
            out.close()
            _test_child(job, test, mine, nonce, write_fd, pid_ns)
        os.close(write_fd)
        mine.close()
        if not pid_ns:
            try:
                os.setpgid(pid, pid)
            except OSError:
                pass
        status = _wait(pid, min(float(job["test_timeout"]), left))
        os.set_blocking(read_fd, False)
        try:
            token = os.read(read_fd, 512)
        except OSError:
            token = b""
        os.close(read_fd)
        _kill_all(pid, pid_ns)
        if token[:1] == b"F" and not first_failure:
            first_failure = f"test {len(statuses)}: " + token[1:].decode("utf-8", "replace")
        # (the solution side kills this test's processes when the next test begins, before it forks its process)
        if status is None:
            statuses.append("timeout")
        elif token == nonce and os.WIFEXITED(status) and os.WEXITSTATUS(status) == 0:
            statuses.append("passed")
        else:
            statuses.append("failed")
    ctl.close()
    out.write(json.dumps({"statuses": statuses, "detail": first_failure}) + "\n")


def _harness_main() -> None:
    job = json.loads(sys.stdin.buffer.read())
    out = os.fdopen(os.dup(1), "w")
    devnull = os.open(os.devnull, os.O_RDWR)
    os.dup2(devnull, 0)
    os.dup2(devnull, 1)
    isolation, pid_ns, detail = _isolate(job)
    role = job.get("role")
    if role == "probe":
        out.write(json.dumps({"isolation": isolation, "detail": detail}) + "\n")
    elif role == "solution":
        out.close()
        _solution_main(job, pid_ns)
    elif role == "test":
        _test_main(job, pid_ns, out)
    out.flush()


if __name__ == "__main__":
    _harness_main()
