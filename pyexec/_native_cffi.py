"""cffi binding of the native core, with the same functions as the Cython module
`pyexec._native`: the fallback where that module is absent, and a cross-check.  Structs come and go
as their bytes; pyexec/native/structs.py decodes them by the header's layout."""
from __future__ import annotations

import mmap
from collections.abc import Sequence
from typing import Protocol

from pyexec import errors

# Compiled by native/cffi_build.py, without a stub: `lib` is typed by _api.Lib (from the header).
from pyexec._pxcffi import ffi as _ffi  # type: ignore[import-not-found]
from pyexec._pxcffi import lib as _lib
from pyexec.native._api import LAYOUTS, CData, Lib

__all__ = ["NAME", "layout", "probe", "now_ns", "set_init", "freeze", "thaw", "rcu_restore", "spawn",
           "spawn_helper", "wait", "kill_tree", "watch_parent"]


class _FFI(Protocol):
    """What this module uses of cffi's `ffi` object."""

    NULL: CData

    def sizeof(self, cdecl: str) -> int: ...
    def offsetof(self, cdecl: str, field: str) -> int: ...
    def new(self, cdecl: str, init: object = ...) -> CData: ...
    def from_buffer(self, buf: bytearray | mmap.mmap, require_writable: bool = ...) -> CData: ...
    def cast(self, cdecl: str, value: CData) -> CData: ...
    def buffer(self, cdata: CData) -> memoryview: ...
    def memmove(self, dest: CData, src: bytes, n: int) -> None: ...


ffi: _FFI = _ffi
lib: Lib = _lib

NAME = "cffi"
_SET_SIZE = ffi.sizeof("px_set")
_CAPTURE_SIZE = ffi.sizeof("px_capture")


def layout() -> dict[str, tuple[int, ...]]:
    """Each struct's sizeof and its fields' offsetof, as the compiler laid them out (for the check at load)."""
    return {name: (ffi.sizeof(name), *(ffi.offsetof(name, f.name) for f in lay.fields))
            for name, lay in LAYOUTS.items()}


def _ptr(ctype: str, buf: bytearray | mmap.mmap | None, size: int) -> tuple[CData, CData | None]:
    if buf is None:
        return ffi.NULL, None
    if len(buf) < size:
        raise ValueError(f"{ctype} buffer too small")
    keep = ffi.from_buffer(buf, require_writable=True)
    return ffi.cast(ctype, keep), keep


def _struct(ctype: str, raw: bytes | None = None) -> CData:
    """A new zeroed struct (a pointer to it), or one holding the bytes raw."""
    p = ffi.new(ctype + " *")
    if raw is not None:
        size = ffi.sizeof(ctype)
        if len(raw) != size:
            raise ValueError(f"{ctype}: {len(raw)} bytes, not {size}")
        ffi.memmove(p, raw, size)
    return p


def _bytes(p: CData) -> bytes:
    return bytes(ffi.buffer(p))


def probe() -> bytes:
    """The px_features of the kernel features in use (1) or replaced by a fallback (0)."""
    f = _struct("px_features")
    lib.px_probe(f)
    return _bytes(f)


def now_ns() -> int:
    """CLOCK_MONOTONIC in ns, as the core stamps it."""
    return lib.px_now_ns()


def set_init(buf: bytearray | mmap.mmap, fds: Sequence[int]) -> int:
    """Load fds into the freeze set in buf; returns 0 or -errno."""
    s, _keep = _ptr("px_set *", buf, _SET_SIZE)
    return lib.px_set_init(s, ffi.new("int32_t[]", list(fds)), len(fds))


def freeze(buf: bytearray | mmap.mmap, flags: int) -> int:
    """FIFREEZE the set in order; returns 0 or -errno of the first failure."""
    s, _keep = _ptr("px_set *", buf, _SET_SIZE)
    return lib.px_freeze(s, flags)


def thaw(buf: bytearray | mmap.mmap, flags: int) -> int:
    """FITHAW what the set says is ours, in reverse; returns 0 or the first -errno."""
    s, _keep = _ptr("px_set *", buf, _SET_SIZE)
    return lib.px_thaw(s, flags)


def rcu_restore(buf: bytearray | mmap.mmap) -> int:
    """Put rcu_expedited back if the set says it is still ours to restore."""
    s, _keep = _ptr("px_set *", buf, _SET_SIZE)
    return lib.px_rcu_restore(s)


def _strv(items: list[bytes]) -> tuple[CData, list[CData]]:
    keep = [ffi.new("char[]", item) for item in items]
    return ffi.new("char *[]", keep + [ffi.NULL]), keep


def spawn(path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
          cgroup_fd: int = -1) -> bytes:
    """Spawn argv; returns its px_proc or raises OSError."""
    p = _struct("px_proc")
    cargv, _ka = _strv(argv)
    cenv, _ke = _strv(env)
    rc = lib.px_spawn(path if path is not None else ffi.NULL, exec_fd, cargv, cenv, cgroup_fd, p)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return _bytes(p)


def spawn_helper(path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
                 cgroup_fds: list[int]) -> bytes:
    """Spawn a helper into cgroup_fds; returns its px_proc or raises OSError."""
    if len(cgroup_fds) > lib.PX_MAX_CGROUPS:
        raise ValueError(f"at most {lib.PX_MAX_CGROUPS} cgroups")
    p = _struct("px_proc")
    cargv, _ka = _strv(argv)
    cenv, _ke = _strv(env)
    fds = ffi.new("int32_t[]", cgroup_fds or [-1])
    rc = lib.px_spawn_helper(path if path is not None else ffi.NULL, exec_fd, cargv, cenv, fds, len(cgroup_fds), p)
    if rc < 0:
        raise errors.oserror(-rc, "spawn", path if path is not None else argv[0])
    return _bytes(p)


def wait(proc: bytes, deadline_ns: int, cancel_fd: int, cap_out: bytearray | None,
         cap_err: bytearray | None) -> tuple[int, bytes]:
    """Wait for exit, deadline or cancel_fd; returns (rc, px_status: zeros unless rc is 0)."""
    st = _struct("px_status")
    co, _k1 = _ptr("px_capture *", cap_out, _CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, _CAPTURE_SIZE)
    rc = lib.px_wait(_struct("px_proc", proc), deadline_ns, cancel_fd, co, ce, st)
    return rc, _bytes(st)


def kill_tree(proc: bytes, cgroup_fd: int, grace_ns: int, kill_wait_ns: int, cap_out: bytearray | None,
              cap_err: bytearray | None) -> tuple[int, bytes]:
    """TERM, grace, KILL the script's tree and reap it; returns (rc, px_status: zeros unless rc is 0)."""
    st = _struct("px_status")
    co, _k1 = _ptr("px_capture *", cap_out, _CAPTURE_SIZE)
    ce, _k2 = _ptr("px_capture *", cap_err, _CAPTURE_SIZE)
    rc = lib.px_kill_tree(_struct("px_proc", proc), cgroup_fd, grace_ns, kill_wait_ns, co, ce, st)
    return rc, _bytes(st)


def watch_parent(parent: int, life_fd: int, death_sig: int) -> tuple[int, int]:
    """Watch this process's parent for its death: (0, fd to poll, or -1 where death_sig will come), or (-errno, -1)."""
    fd = ffi.new("int32_t[1]", [-1])
    rc = lib.px_watch_parent(parent, life_fd, death_sig, fd)
    return rc, int.from_bytes(ffi.buffer(fd), "little", signed=True)
