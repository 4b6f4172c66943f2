"""Which binding of the native core is in use, and the Python view of its structures.

Both bindings (`pyexec._native`, Cython; `pyexec._native_cffi`, cffi) expose the same raw
functions over the same C code.  This module picks one (Cython by default, cffi when the
Cython module is absent, or as `PYEXEC_BACKEND=cython|cffi` says) and wraps it in `Native`,
which adds the layout of the C structures so results come back as plain Python objects.
"""
from __future__ import annotations

import dataclasses
import errno
import importlib
import mmap
import os
import struct
from collections.abc import Callable, Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

if TYPE_CHECKING:
    from _typeshed import ReadableBuffer, StrOrBytesPath

# Flags and states of native/pyexec_core.h.
FREEZE_EXPEDITE = 1
FREEZE_PRESYNC = 2
SPAWN_DIE_WITH_PARENT = -2  # as cgroup_fd: no cgroup, and the kernel kills the child if we die
THAW_IN_FLIGHT = 2
G_NONE, G_READY, G_FIRED_DEADLINE, G_FIRED_DIED, G_LOST = range(5)
MOUNT_STATES = ("idle", "freezing", "frozen", "busy", "thawed", "failed")
RCU_STATES = ("untouched", "set", "restored", "skipped", "already")
PHASES = ("idle", "freezing", "frozen", "thawing", "done")

_SET_HEADER = struct.Struct("=IIiiiiiiiiiiqqq")
_MOUNT = struct.Struct("=iiiiiiqqqqqq")
_CAP_HEADER = struct.Struct("=QQIIII")
CAP_HALF = 65536

_MODULES = {"cython": "pyexec._native", "cffi": "pyexec._native_cffi"}
SetBuffer = bytearray | mmap.mmap  # memory for a px_set: a bytearray, or the journal page
StatusTuple = tuple[int, int, int, int, int, int, int]  # px_status: code, signal, core, utime, stime, maxrss, seen
ProcTuple = tuple[int, int, int, int]  # px_proc: pid, pidfd, out_fd, err_fd


class Binding(Protocol):
    """What each binding module provides: pyexec/_native.pyi (Cython), pyexec/_native_cffi.py."""

    NAME: str
    SET_SIZE: int
    CAPTURE_SIZE: int
    MAX_MOUNTS: int
    KILL_WAIT_NS: int

    def probe(self) -> tuple[int, int, int, int, int, int, int, int, int]: ...
    def now_ns(self) -> int: ...
    def set_init(self, buf: SetBuffer, fds: Sequence[int]) -> int: ...
    def freeze(self, buf: SetBuffer, flags: int) -> int: ...
    def thaw(self, buf: SetBuffer, flags: int) -> int: ...
    def rcu_restore(self, buf: SetBuffer) -> int: ...
    def spawn(self, path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
              cgroup_fd: int = -1) -> ProcTuple: ...
    def spawn_helper(self, path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
                     cgroup_fds: list[int]) -> ProcTuple: ...
    def wait(self, proc: ProcTuple, deadline_ns: int, cancel_fd: int, cap_out: bytearray | None,
             cap_err: bytearray | None) -> tuple[int, StatusTuple | None]: ...
    def kill_tree(self, proc: ProcTuple, cgroup_fd: int, grace_ns: int, kill_wait_ns: int,
                  cap_out: bytearray | None, cap_err: bytearray | None) -> tuple[int, StatusTuple | None]: ...
    def watch_parent(self, parent: int, life_fd: int, death_sig: int) -> tuple[int, int]: ...


if TYPE_CHECKING:  # mypy checks both bindings against Binding (load() can only cast)
    from pyexec import _native, _native_cffi
    _cython: Binding = _native
    _cffi: Binding = _native_cffi


@dataclasses.dataclass(frozen=True)
class MountRecord:
    """One mount of a freeze set as the core left it (ns stamps, CLOCK_MONOTONIC)."""

    fd: int
    state: str
    freeze_errno: int
    thaw_errno: int
    sync_errno: int
    guardian_fd: int
    sync_start_ns: int
    sync_end_ns: int
    freeze_start_ns: int
    freeze_end_ns: int
    thaw_start_ns: int
    thaw_end_ns: int


@dataclasses.dataclass(frozen=True)
class SetRecord:
    """The header of a freeze set and its mounts."""

    n: int
    flags: int
    phase: str
    rcu_state: str
    rcu_prev: int
    failed_index: int
    failed_errno: int
    controller_pid: int
    guardian_pid: int
    guardian_state: int
    deadline_ns: int
    window_start_ns: int
    window_end_ns: int
    mounts: tuple[MountRecord, ...]


@dataclasses.dataclass(frozen=True)
class Status:
    """How a reaped process ended."""

    code: int  # exit status, -1 when killed by a signal
    signal: int
    core: bool
    utime_ns: int
    stime_ns: int
    maxrss_kb: int
    exit_seen_ns: int


@dataclasses.dataclass(frozen=True)
class Captured:
    """Bounded output: the first and last 64 KiB, and how much was dropped between."""

    head: bytes
    tail: bytes
    total: int
    dropped: int

    @property
    def data(self) -> bytes:
        """Head and tail joined (the whole output when nothing was dropped)."""
        return self.head + self.tail


@dataclasses.dataclass(frozen=True)
class Proc:
    """A spawned child: pid, pidfd and the read ends of its stdout/stderr pipes."""

    pid: int
    pidfd: int
    out_fd: int
    err_fd: int

    def astuple(self) -> ProcTuple:
        return (self.pid, self.pidfd, self.out_fd, self.err_fd)

    def close(self) -> None:
        """Close the pidfd and pipes (after the child is reaped)."""
        for fd in (self.pidfd, self.out_fd, self.err_fd):
            if fd >= 0:
                os.close(fd)


def read_set(buf: ReadableBuffer) -> SetRecord:
    """Decode a px_set from buf."""
    h = _SET_HEADER.unpack_from(buf, 0)
    magic, n = h[0], h[2]
    if magic != 0x50584653:
        raise ValueError("not a pyexec freeze set")
    mounts = []
    for i in range(n):
        f = _MOUNT.unpack_from(buf, _SET_HEADER.size + i * _MOUNT.size)
        mounts.append(MountRecord(f[0], MOUNT_STATES[f[1]], *f[2:]))
    return SetRecord(n, h[3], PHASES[h[4]], RCU_STATES[h[5]], h[6], h[7], h[8], h[9], h[10], h[11],
                     h[12], h[13], h[14], tuple(mounts))


_MOUNT_FIELDS = ("fd", "state", "freeze_errno", "thaw_errno", "sync_errno", "guardian_fd", "sync_start_ns",
                 "sync_end_ns", "freeze_start_ns", "freeze_end_ns", "thaw_start_ns", "thaw_end_ns")
_CAP_FIELDS = ("total", "dropped", "head_len", "tail_len", "tail_pos", "eof")
_HEADER_FIELDS = ("magic", "version", "n", "flags", "phase", "rcu_state", "rcu_prev", "failed_index",
                  "failed_errno", "controller_pid", "guardian_pid", "guardian_state", "deadline_ns",
                  "window_start_ns", "window_end_ns")


def _field_offset(st: struct.Struct, index: int) -> tuple[int, str]:
    fmt = st.format.lstrip("=")
    return struct.calcsize("=" + fmt[:index]), "=" + fmt[index]


def set_header(buf: SetBuffer, **fields: int) -> None:
    """Store header fields of a px_set in buf (e.g. controller_pid, deadline_ns, guardian_state)."""
    for name, value in fields.items():
        off, fmt = _field_offset(_SET_HEADER, _HEADER_FIELDS.index(name))
        struct.pack_into(fmt, buf, off, value)


def set_mount_fd(buf: SetBuffer, i: int, fd: int) -> None:
    """Store the fd of mount i of a px_set in buf (recover reopens a dead run's mounts)."""
    struct.pack_into("=i", buf, _SET_HEADER.size + i * _MOUNT.size, fd)


def set_mount_state(buf: SetBuffer, i: int, state: int) -> None:
    """Store the state (an index of MOUNT_STATES) of mount i of a px_set in buf (a journal's copy)."""
    off, fmt = _field_offset(_MOUNT, _MOUNT_FIELDS.index("state"))
    struct.pack_into(fmt, buf, _SET_HEADER.size + i * _MOUNT.size + off, state)


def read_capture(buf: bytearray) -> Captured:
    """Decode a px_capture from buf."""
    total, dropped, head_len, tail_len, tail_pos, _eof = _CAP_HEADER.unpack_from(buf, 0)
    base = _CAP_HEADER.size
    head = bytes(buf[base:base + head_len])
    ring = base + CAP_HALF
    if tail_len < CAP_HALF:
        tail = bytes(buf[ring:ring + tail_len])
    else:
        tail = bytes(buf[ring + tail_pos:ring + CAP_HALF]) + bytes(buf[ring:ring + tail_pos])
    return Captured(head, tail, total, dropped)


class Native:
    """One binding of the native core, with results decoded into Python objects."""

    def __init__(self, mod: Binding):
        self.mod = mod
        self.name = mod.NAME
        self.set_size = mod.SET_SIZE
        self.capture_size = mod.CAPTURE_SIZE
        self.max_mounts = mod.MAX_MOUNTS
        self.kill_wait_ns = mod.KILL_WAIT_NS  # PX_KILL_WAIT_NS: the warden's wait too
        if self.set_size != _SET_HEADER.size + self.max_mounts * _MOUNT.size:
            raise ImportError(f"{self.name}: px_set layout does not match pyexec.native")
        if self.capture_size != _CAP_HEADER.size + 2 * CAP_HALF:
            raise ImportError(f"{self.name}: px_capture layout does not match pyexec.native")
        offsets: Callable[[str, Iterable[str]], list[int]] | None = getattr(mod, "offsets", None)
        if offsets is not None:  # cffi knows the compiler's offsetof: every field, not only sizes
            for cname, st, names, tail in (("px_set", _SET_HEADER, _HEADER_FIELDS, "m"),
                                           ("px_mount", _MOUNT, _MOUNT_FIELDS, None),
                                           ("px_capture", _CAP_HEADER, _CAP_FIELDS, "head")):
                want = [_field_offset(st, i)[0] for i in range(len(names))] + ([st.size] if tail else [])
                if offsets(cname, names + ((tail,) if tail else ())) != want:
                    raise ImportError(f"{self.name}: {cname} field offsets do not match pyexec.native")

    def now_ns(self) -> int:
        """CLOCK_MONOTONIC ns."""
        return self.mod.now_ns()

    def features(self) -> dict[str, bool]:
        """Which kernel features the core uses (True) or replaces by their fallback (False)."""
        return dict(zip(FEATURES, map(bool, self.mod.probe())))

    def new_set(self) -> bytearray:
        """Memory for one freeze set."""
        return bytearray(self.set_size)

    def new_capture(self) -> bytearray:
        """Memory for one output capture."""
        return bytearray(self.capture_size)

    def set_init(self, buf: SetBuffer, fds: Iterable[int]) -> int:
        """Load fds (in freeze order) into buf: 0 or -errno."""
        return self.mod.set_init(buf, list(fds))

    def freeze(self, buf: SetBuffer, flags: int = 0) -> int:
        """FIFREEZE every mount of buf in order: 0 or -errno (buf says which failed)."""
        return self.mod.freeze(buf, flags)

    def thaw(self, buf: SetBuffer, flags: int = 0) -> int:
        """FITHAW what buf says is ours, in reverse: 0 or the first -errno."""
        return self.mod.thaw(buf, flags)

    def rcu_restore(self, buf: SetBuffer) -> int:
        """Put rcu_expedited back where buf says it is still ours."""
        return self.mod.rcu_restore(buf)

    def spawn(self, argv: Sequence[StrOrBytesPath], env: Mapping[str, str], path: StrOrBytesPath | None = None,
              exec_fd: int = -1, cgroup_fd: int = -1) -> Proc:
        """Spawn argv with env (a dict); OSError on exec failure.  Executes path (argv[0] when neither
        path nor exec_fd is given), with exec_fd (if >= 0) as fd 3 in the child; path None and
        exec_fd >= 0 executes exec_fd itself."""
        if path is None and exec_fd < 0:
            path = argv[0]
        bargv = [os.fsencode(a) for a in argv]
        benv = [os.fsencode(k) + b"=" + os.fsencode(v) for k, v in env.items()]
        bpath = os.fsencode(path) if path is not None else None
        return Proc(*self.mod.spawn(bpath, exec_fd, bargv, benv, cgroup_fd))

    def spawn_helper(self, argv: Sequence[StrOrBytesPath], path: StrOrBytesPath, exec_fd: int = -1,
                     cgroup_fds: Sequence[int] = ()) -> Proc:
        """Spawn a helper that outlives this process and its cgroup (the guardian, the warden): as
        spawn with no environment, started inside each of cgroup_fds (pyexec's own cgroups, one per
        hierarchy) before any of it runs, never killed with us; OSError on exec failure."""
        bargv = [os.fsencode(a) for a in argv]
        return Proc(*self.mod.spawn_helper(os.fsencode(path), exec_fd, bargv, [], list(cgroup_fds)))

    def wait(self, proc: Proc, deadline_ns: int = -1, out: bytearray | None = None, err: bytearray | None = None,
             cancel_fd: int = -1) -> Status | None:
        """Wait for proc to exit (reaped: Status) or for the deadline (None); Cancelled when
        cancel_fd becomes readable first (proc not reaped)."""
        rc, st = self.mod.wait(proc.astuple(), deadline_ns, cancel_fd, out, err)
        if rc == -errno.ECANCELED:
            raise Cancelled()
        return self._status(rc, st, "wait")

    def kill_tree(self, proc: Proc, grace_ns: int, kill_wait_ns: int, out: bytearray | None = None,
                  err: bytearray | None = None, cgroup_fd: int = -1) -> Status | None:
        """TERM the tree, wait grace_ns, KILL it, reap: Status, or None if it would not die."""
        rc, st = self.mod.kill_tree(proc.astuple(), cgroup_fd, grace_ns, kill_wait_ns, out, err)
        return self._status(rc, st, "kill_tree")

    def watch_parent(self, parent: int, life_fd: int = -1, death_sig: int = 0) -> int:
        """The one watch of this process's parent (px_watch_parent): an fd that polls readable once
        parent is gone, or -1 where the kernel will send death_sig instead; OSError (ESRCH: it is
        gone already) otherwise."""
        rc, fd = self.mod.watch_parent(parent, life_fd, death_sig)
        if rc < 0:
            from pyexec import errors
            raise errors.oserror(-rc, "watch_parent")
        return fd

    @staticmethod
    def _status(rc: int, st: StatusTuple | None, what: str) -> Status | None:
        if rc == 0 and st is not None:
            return Status(st[0], st[1], bool(st[2]), *st[3:])
        if rc == -errno.ETIMEDOUT:
            return None
        from pyexec import errors
        raise errors.oserror(-rc, what)


FEATURES = ("pidfd_open", "waitid_pidfd", "clone3_cgroup", "close_range_cloexec", "cgroup_kill", "cgroup_freeze",
            "openat2", "cgroup2", "cgroup_v1")
_life: tuple[int, int, int] | None = None  # (pid, read end, write end)


def life_fd() -> int:
    """The read end of this process's life pipe: the guardian and the warden watch it for the
    hang-up that means this process died, where the kernel has no pidfd_open (before 5.3).  This
    process holds the only write end (close-on-exec, so no script inherits it)."""
    global _life
    if _life is None or _life[0] != os.getpid():  # a forked child needs its own
        r, w = os.pipe2(os.O_CLOEXEC)
        _life = (os.getpid(), r, w)
    return _life[1]


class Cancelled(Exception):
    """A wait was cut short by its cancel fd (a signal arrived): the process still runs."""


_loaded: dict[str, Native] = {}


def load(name: str) -> Native:
    """The named binding ('cython' or 'cffi'); ImportError if it is not built."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose cython or cffi")
    if name not in _loaded:
        # A module satisfies Binding structurally; import_module can only say ModuleType.
        _loaded[name] = Native(cast(Binding, importlib.import_module(_MODULES[name])))
    return _loaded[name]


def available() -> list[str]:
    """The bindings that import on this installation."""
    names = []
    for name in _MODULES:
        try:
            load(name)
        except ImportError:
            continue
        names.append(name)
    return names


def default() -> Native:
    """The binding in use: PYEXEC_BACKEND if set, else Cython, else cffi."""
    wanted = os.environ.get("PYEXEC_BACKEND")
    if wanted:
        return load(wanted)
    try:
        return load("cython")
    except ImportError:
        return load("cffi")
