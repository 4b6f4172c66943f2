"""Which binding of the native core is in use, checked against the header's layout when it loads.

Both bindings (`pyexec._native`, Cython; `pyexec._native_cffi`, cffi) expose the same raw functions
over the same C code, and hand structs back as their bytes.  This module picks one (Cython by
default, cffi when the Cython module is absent, or as `PYEXEC_BACKEND=cython|cffi` says), checks that
the compiler laid every struct out as pyexec/native/_api.py says (sizes and every field's offset),
and wraps it in `Native`, whose results are plain Python objects (pyexec/native/structs.py).
"""
from __future__ import annotations

import importlib
import os
from collections.abc import Iterable, Mapping, Sequence
from typing import TYPE_CHECKING, Protocol, cast

from pyexec import errors
from pyexec.native import _api
from pyexec.native.structs import Proc, SetBuffer, Status, read_features, read_status

if TYPE_CHECKING:
    from _typeshed import StrOrBytesPath

_MODULES = {"cython": "pyexec._native", "cffi": "pyexec._native_cffi"}


class Binding(Protocol):
    """What each binding module provides (pyexec/_native.pyx, pyexec/_native_cffi.py; the Cython
    module's stub re-exports the cffi module's signatures).  Structs come and go as their bytes."""

    NAME: str

    def layout(self) -> dict[str, tuple[int, ...]]: ...
    def probe(self) -> bytes: ...
    def now_ns(self) -> int: ...
    def set_init(self, buf: SetBuffer, fds: Sequence[int]) -> int: ...
    def freeze(self, buf: SetBuffer, flags: int) -> int: ...
    def thaw(self, buf: SetBuffer, flags: int) -> int: ...
    def rcu_restore(self, buf: SetBuffer) -> int: ...
    def spawn(self, path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
              cgroup_fd: int = -1) -> bytes: ...
    def spawn_helper(self, path: bytes | None, exec_fd: int, argv: list[bytes], env: list[bytes],
                     cgroup_fds: list[int]) -> bytes: ...
    def wait(self, proc: bytes, deadline_ns: int, cancel_fd: int, cap_out: bytearray | None,
             cap_err: bytearray | None) -> tuple[int, bytes]: ...
    def kill_tree(self, proc: bytes, cgroup_fd: int, grace_ns: int, kill_wait_ns: int,
                  cap_out: bytearray | None, cap_err: bytearray | None) -> tuple[int, bytes]: ...
    def watch_parent(self, parent: int, life_fd: int, death_sig: int) -> tuple[int, int]: ...


if TYPE_CHECKING:  # mypy checks both bindings against Binding (load() can only cast)
    from pyexec import _native, _native_cffi
    _cython: Binding = _native
    _cffi: Binding = _native_cffi


def check_layout(name: str, compiled: Mapping[str, tuple[int, ...]],
                 layouts: Mapping[str, _api.Layout] = _api.LAYOUTS) -> None:
    """ImportError unless the compiler's sizeof and offsetof of every field of every struct (as a
    binding reports them) are those of layouts (pyexec/native/_api.py's), which Python reads by."""
    for sname, lay in layouts.items():
        want = (lay.size, *(f.offset for f in lay.fields))
        got = compiled.get(sname)
        if got != want:
            raise ImportError(f"{name}: {sname} is laid out as {got} (size, offsets) by the compiler, "
                              f"as {want} by pyexec/native/_api.py: rebuild from one pyexec_core.h")


class Native:
    """One binding of the native core, with results decoded into Python objects."""

    def __init__(self, mod: Binding):
        check_layout(mod.NAME, mod.layout())
        self.mod = mod
        self.name = mod.NAME
        self.set_size = _api.PX_SET.size
        self.capture_size = _api.PX_CAPTURE.size
        self.max_mounts = _api.PX_MAX_MOUNTS
        self.kill_wait_ns = _api.PX_KILL_WAIT_NS  # the warden's wait too

    def now_ns(self) -> int:
        """CLOCK_MONOTONIC ns."""
        return self.mod.now_ns()

    def features(self) -> dict[str, bool]:
        """Which kernel features the core uses (True) or replaces by their fallback (False)."""
        return read_features(self.mod.probe())

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
        return Proc.decode(self.mod.spawn(bpath, exec_fd, bargv, benv, cgroup_fd))

    def spawn_helper(self, argv: Sequence[StrOrBytesPath], path: StrOrBytesPath, exec_fd: int = -1,
                     cgroup_fds: Sequence[int] = ()) -> Proc:
        """Spawn a helper that outlives this process and its cgroup (the guardian, the warden): as
        spawn with no environment, started inside each of cgroup_fds (pyexec's own cgroups, one per
        hierarchy) before any of it runs, never killed with us; OSError on exec failure."""
        bargv = [os.fsencode(a) for a in argv]
        return Proc.decode(self.mod.spawn_helper(os.fsencode(path), exec_fd, bargv, [], list(cgroup_fds)))

    def wait(self, proc: Proc, deadline_ns: int = -1, out: bytearray | None = None, err: bytearray | None = None,
             cancel_fd: int = -1) -> Status | None:
        """Wait for proc to exit (reaped: Status) or for the deadline (None); Cancelled when
        cancel_fd becomes readable first (proc not reaped)."""
        rc, st = self.mod.wait(proc.encode(), deadline_ns, cancel_fd, out, err)
        return read_status(st) if errors.wait_outcome(rc, "wait") else None

    def kill_tree(self, proc: Proc, grace_ns: int, kill_wait_ns: int, out: bytearray | None = None,
                  err: bytearray | None = None, cgroup_fd: int = -1) -> Status | None:
        """TERM the tree, wait grace_ns, KILL it, reap: Status, or None if it would not die."""
        rc, st = self.mod.kill_tree(proc.encode(), cgroup_fd, grace_ns, kill_wait_ns, out, err)
        return read_status(st) if errors.wait_outcome(rc, "kill_tree") else None

    def watch_parent(self, parent: int, life_fd: int = -1, death_sig: int = 0) -> int:
        """The one watch of this process's parent (px_watch_parent): an fd that polls readable once
        parent is gone, or -1 where the kernel will send death_sig instead; OSError (ESRCH: it is
        gone already) otherwise."""
        rc, fd = self.mod.watch_parent(parent, life_fd, death_sig)
        if rc < 0:
            raise errors.oserror(-rc, "watch_parent")
        return fd


_loaded: dict[str, Native] = {}


def load(name: str) -> Native:
    """The named binding ('cython' or 'cffi'); ImportError if it is not built or does not match the header."""
    if name not in _MODULES:
        raise ValueError(f"unknown backend {name!r}: choose cython or cffi")
    if name not in _loaded:
        # A module satisfies Binding structurally; import_module can only say ModuleType.
        _loaded[name] = Native(cast(Binding, importlib.import_module(_MODULES[name])))
    return _loaded[name]


def default() -> Native:
    """The binding in use: PYEXEC_BACKEND if set, else Cython, else cffi."""
    wanted = os.environ.get("PYEXEC_BACKEND")
    if wanted:
        return load(wanted)
    try:
        return load("cython")
    except ImportError:
        return load("cffi")
