"""cffi binding of the native core, with the same functions as the Cython module
`pyexec._native`: the fallback where that module is absent, and a cross-check."""
from __future__ import annotations

import mmap
from collections.abc import Iterable, Sequence
from typing import Literal, Protocol, overload

from pyexec import errors
# Compiled by native/cffi_build.py, without a stub: typed below by what this module uses of it.
from pyexec._pxcffi import ffi as _ffi, lib as _lib  # type: ignore[import-not-found]


# What this module uses of cffi's `ffi` and of the compiled `lib` (native/pyexec_core.h's API).
class _CData(Protocol):
    """An opaque cffi pointer or array."""


class _Features(Protocol):
    pidfd_open: int
    waitid_pidfd: int
    clone3_cgroup: int
    close_range_cloexec: int
    cgroup_kill: int
    cgroup_freeze: int
    openat2: int
    cgroup2: int
    cgroup_v1: int


class _Proc(Protocol):
    pid: int
    pidfd: int
    out_fd: int
    err_fd: int


class _Status(Protocol):
    code: int
    signal: int
    core: int
    utime_ns: int
    stime_ns: int
    maxrss_kb: int
    exit_seen_ns: int


class _Int32Ptr(Protocol):
    def __getitem__(self, index: int) -> int: ...


class _FFI(Protocol):
    NULL: _CData

    def sizeof(self, cdecl: str) -> int: ...
    def offsetof(self, cdecl: str, field: str) -> int: ...
    @overload
    def new(self, cdecl: Literal["px_features *"]) -> _Features: ...
    @overload
    def new(self, cdecl: Literal["px_proc *"]) -> _Proc: ...
    @overload
    def new(self, cdecl: Literal["px_status *"]) -> _Status: ...
    @overload
    def new(self, cdecl: Literal["int32_t *"], init: int) -> _Int32Ptr: ...
    @overload
    def new(self, cdecl: str, init: object) -> _CData: ...
    def from_buffer(self, buf: bytearray | mmap.mmap, require_writable: bool = ...) -> _CData: ...
    def cast(self, cdecl: str, value: _CData) -> _CData: ...


class _Lib(Protocol):
    PX_MAX_MOUNTS: int
    PX_MAX_CGROUPS: int
    PX_KILL_WAIT_NS: int

    def px_probe(self, f: _Features) -> int: ...
    def px_now_ns(self) -> int: ...
    def px_set_init(self, s: _CData, fds: _CData, n: int) -> int: ...
    def px_freeze(self, s: _CData, flags: int) -> int: ...
    def px_thaw(self, s: _CData, flags: int) -> int: ...
    def px_rcu_restore(self, s: _CData) -> int: ...
    def px_spawn(self, path: bytes | _CData, exec_fd: int, argv: _CData, envp: _CData, cgroup_fd: int,
                 p: _Proc) -> int: ...
    def px_spawn_helper(self, path: bytes | _CData, exec_fd: int, argv: _CData, envp: _CData, cgroup_fds: _CData,
                        n: int, p: _Proc) -> int: ...
    def px_wait(self, p: _Proc, deadline_ns: int, cancel_fd: int, out: _CData, err: _CData, st: _Status) -> int: ...
    def px_kill_tree(self, p: _Proc, cgroup_fd: int, grace_ns: int, kill_wait_ns: int, out: _CData, err: _CData,
                     st: _Status) -> int: ...
    def px_watch_parent(self, parent: int, life_fd: int, death_sig: int, fd: _Int32Ptr) -> int: ...


ffi: _FFI = _ffi
lib: _Lib = _lib
StatusTuple = tuple[int, int, int, int, int, int, int]
ProcTuple = tuple[int, int, int, int]

NAME = "cffi"
SET_SIZE = ffi.sizeof("px_set")
CAPTURE_SIZE = ffi.sizeof("px_capture")
MAX_MOUNTS = lib.PX_MAX_MOUNTS
KILL_WAIT_NS = lib.PX_KILL_WAIT_NS


def offsets(struct_name: str, fields: Iterable[str]) -> list[int]:
    """offsetof each field of a C struct, as the compiler laid it out (for the layout check)."""
    return [ffi.offsetof(struct_name, f) for f in fields]


def _ptr(ctype: str, buf: bytearray | mmap.mmap | None, size: int) -> tuple[_CData, _CData | None]:
    if buf is None:
        return ffi.NULL, None
    if len(buf) < size:
        raise ValueError(f"{ctype} buffer too small")
    keep = ffi.from_buffer(buf, require_writable=True)
    return ffi.cast(ctype, keep), keep


def _status(st: _Status) -> StatusTuple:
    return (st.code, st.signal, st.core, st.utime_ns, st.stime_ns, st.maxrss_kb, st.exit_seen_ns)


def probe() -> tuple[int, int, int, int, int, int, int, int, int]:
    """The kernel features in use (1) or replaced by a fallback (0), in px_features order."""
    f = ffi.new("px_features *")
    lib.px_probe(f)
    return (f.pidfd_open, f.waitid_pidfd, f.clone3_cgroup, f.close_range_cloexec, f.cgroup_kill,
            f.cgroup_freeze, f.openat2, f.cgroup2, f.cgroup_v1)


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns, as the core stamps it."""
    return lib.px_now_ns()


def set_init(buf: bytearray | mmap.mmap, fds: Sequence[int]) -> int:
    """Load fds into the freeze set in buf; returns 0 or -errno."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_set_init(s, ffi.new("int32_t[]", list(fds)), len(fds))


def freeze(buf: bytearray | mmap.mmap, flags: int) -> int:
    """FIFREEZE the set in order; returns 0 or -errno of the first failure."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_freeze(s, flags)


def thaw(buf: bytearray | mmap.mmap, flags: int) -> int:
    """FITHAW what the set says is ours, in reverse; returns 0 or the first -errno."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_thaw(s, flags)


def rcu_restore(buf: bytearray | mmap.mmap) -> int:
    """Put rcu_expedited back if the set says it is still ours to restore."""
    s, _keep = _ptr("px_set *", buf, SET_SIZE)
    return lib.px_rcu_restore(s)


def _strv(items: list[bytes]) -> tuple[_CData, list[_CData]]:
    keep = [ffi.new("char[]", item) for item in items]
    return ffi.new("char *[]", keep + [ffi.NULL]), keep


def spawn(path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
          cgroup_fd: int = -1) -> ProcTuple:
    """Spawn argv; returns (pid, pidfd, out_fd, err_fd) or raises OSError."""
    p = ffi.new("px_proc *")
    cargv, _ka = _strv(argv)
    cenv, _ke = _strv(env)
    rc = lib.px_spawn(path if path is not None else ffi.NULL, exec_fd, cargv, cenv, cgroup_fd, p)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return (p.pid, p.pidfd, p.out_fd, p.err_fd)


def spawn_helper(path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
                 cgroup_fds: list[int]) -> ProcTuple:
    """Spawn a helper into cgroup_fds; returns (pid, pidfd, out_fd, err_fd) or raises OSError."""
    if len(cgroup_fds) > lib.PX_MAX_CGROUPS:
        raise ValueError(f"at most {lib.PX_MAX_CGROUPS} cgroups")
    p = ffi.new("px_proc *")
    cargv, _ka = _strv(argv)
    cenv, _ke = _strv(env)
    fds = ffi.new("int32_t[]", cgroup_fds or [-1])
    rc = lib.px_spawn_helper(path if path is not None else ffi.NULL, exec_fd, cargv, cenv, fds, len(cgroup_fds), p)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return (p.pid, p.pidfd, p.out_fd, p.err_fd)


def _proc(proc: ProcTuple) -> _Proc:
    p = ffi.new("px_proc *")
    p.pid, p.pidfd, p.out_fd, p.err_fd = proc
    return p


def wait(proc: ProcTuple, deadline_ns: int, cancel_fd: int, cap_out: bytearray | None,
         cap_err: bytearray | None) -> tuple[int, StatusTuple | None]:
    """Wait for exit, deadline or cancel_fd; returns (rc, status tuple or None)."""
    st = ffi.new("px_status *")
    co, _k1 = _ptr("px_capture *", cap_out, CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, CAPTURE_SIZE)
    rc = lib.px_wait(_proc(proc), deadline_ns, cancel_fd, co, ce, st)
    return rc, (_status(st) if rc == 0 else None)


def kill_tree(proc: ProcTuple, cgroup_fd: int, grace_ns: int, kill_wait_ns: int, cap_out: bytearray | None,
              cap_err: bytearray | None) -> tuple[int, StatusTuple | None]:
    """TERM, grace, KILL the script's tree and reap it; returns (rc, status tuple or None)."""
    st = ffi.new("px_status *")
    co, _k1 = _ptr("px_capture *", cap_out, CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, CAPTURE_SIZE)
    rc = lib.px_kill_tree(_proc(proc), cgroup_fd, grace_ns, kill_wait_ns, co, ce, st)
    return rc, (_status(st) if rc == 0 else None)


def watch_parent(parent: int, life_fd: int, death_sig: int) -> tuple[int, int]:
    """Watch this process's parent for its death: (0, fd to poll, or -1 where death_sig will come), or (-errno, -1)."""
    fd = ffi.new("int32_t *", -1)
    rc = lib.px_watch_parent(parent, life_fd, death_sig, fd)
    return rc, fd[0]
