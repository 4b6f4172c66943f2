"""pyexec's own cgroups, outside the caller's: this process's directory in each hierarchy (found by
pyexec.kernel; its scripts' leaves, its helpers' leaf), and the warden that kills its scripts and
removes the directories when this process ends, however it ends (native/warden.c).

Layout, in each hierarchy pyexec uses (<mount>/pyexec/<pid>/...):
  run-N   a running script (the scripts' hierarchy only: cgroup v2, else the v1 freezer)
  done    what a finished script left running on purpose (a post-script's daemon)
  guard   the thaw guardians
and the warden lives in <mount>/pyexec itself.  Neither is in the caller's cgroup, so a kill of that
cgroup (cgroup.kill, systemd's kill of the unit, an OOM group kill, a container's or a v1 freezer-based
kill) or its freeze leaves them to thaw and to kill the scripts.  The hierarchies: cgroup v2, the v1
freezer, and v1 name=systemd (a v1 or hybrid systemd finds a unit's processes there)."""
from __future__ import annotations

import contextlib
import itertools
import os
import threading
from collections.abc import Iterator

from pyexec import kernel, native

WARDEN = os.path.join(os.path.dirname(__file__), "pyexec-warden")
GUARD = "guard"  # the guardians' leaf (PX_GUARD_LEAF in native/pyexec_core.h, for the C programs)
_cg_seq = itertools.count()  # N of the scripts' leaves run-N


class Warden:
    """This process's cgroup directories and the warden that empties and removes them when this
    process ends, however it ends (native/warden.c).  The warden lives in pyexec's directory of each
    hierarchy, the guardians in this process's "guard" leaves."""

    _lock = threading.Lock()
    _current: Warden | None = None

    def __init__(self, roots: list[str]):
        self.pid = os.getpid()
        # pyexec's directory in each hierarchy (a read-only name=systemd is skipped: the helpers stay
        # in the caller's cgroup there): where the warden lives, and what it sweeps.
        self.parents: list[str] = []
        for root in roots:
            parent = os.path.join(root, "pyexec")
            try:
                os.makedirs(parent, exist_ok=True)
            except OSError:
                if root == roots[0]:
                    raise
                continue
            self.parents.append(parent)
        self.path = os.path.join(self.parents[0], str(self.pid))  # the scripts' directory
        fds: list[int] = []
        try:
            for parent in self.parents:
                fds.append(os.open(parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            # The warden first, then our directories: a kill in between leaves nothing unwatched.
            # It is never waited for (it outlives us by design), so its fds are of no use here.
            native.default().spawn_helper([WARDEN, str(self.pid), str(native.life_fd()), *self.parents],
                                          path=WARDEN, cgroup_fds=fds).close()
        finally:
            for fd in fds:
                os.close(fd)
        self.guards: list[str] = []
        for parent in self.parents:
            guard = os.path.join(parent, str(self.pid), GUARD)
            try:
                os.makedirs(guard, exist_ok=True)
            except OSError:
                if parent == self.parents[0]:
                    raise
                continue
            self.guards.append(guard)

    @contextlib.contextmanager
    def guard_fds(self) -> Iterator[list[int]]:
        """The guardians' leaves, open (for px_spawn_helper) for the with-block; none if one cannot
        be opened (removed by hand): the guardian then starts in the caller's cgroup rather than not."""
        fds: list[int] = []
        try:
            try:
                for g in self.guards:
                    fds.append(os.open(g, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError:
                for fd in fds:
                    os.close(fd)
                fds = []
            yield fds
        finally:
            for fd in fds:
                os.close(fd)

    @classmethod
    def get(cls) -> Warden | None:
        """The warden of this process (started on first use), or None without a usable cgroup."""
        with cls._lock:
            cur = cls._current
            if cur is None or cur.pid != os.getpid():  # a forked child needs its own
                roots = kernel.hierarchies()
                try:
                    cur = cls._current = cls(roots) if roots else None
                except OSError:
                    cur = None
            return cur


@contextlib.contextmanager
def helper_cgroups() -> Iterator[tuple[list[int], list[str]]]:
    """Where a guardian starts, outside the caller's cgroup: the fds of this process's guardians'
    leaves (open for the with-block) and pyexec's directory in each hierarchy; empty lists without a
    usable cgroup."""
    warden = Warden.get()
    if warden is None:
        yield [], []
        return
    with warden.guard_fds() as fds:
        yield fds, warden.parents


@contextlib.contextmanager
def script_cgroup(enabled: bool = True) -> Iterator[int]:
    """A fresh leaf cgroup (its fd) for one script, in the first hierarchy pyexec has its own directory
    in (cgroup v2, else the v1 freezer), or -1 where it has none (the script is then killed by its
    process group).

    While the script runs the leaf is named run-N, which the warden kills if this process dies.
    After it, whatever the script left running on purpose (a daemon a post-script started) moves
    to the sibling "done", which the warden leaves alone (cgroup v2 refuses to rename a cgroup)."""
    warden = Warden.get() if enabled else None
    run = fd = None
    if warden:
        run = os.path.join(warden.path, f"run-{next(_cg_seq)}")
        try:
            os.mkdir(run)
            fd = os.open(run, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            pass  # fall back to process-group kills
    try:
        yield fd if fd is not None else -1
    finally:
        if fd is not None:
            os.close(fd)
        if run and warden:  # run is only made inside warden's directory
            _retire(run, os.path.join(warden.path, "done"))


def _retire(leaf: str, done: str) -> None:
    """Remove a finished script's leaf, moving the processes it left behind into done first."""
    for _ in range(64):  # each pass moves what is there; a fork during one is caught by the next
        try:
            os.rmdir(leaf)
            return
        except FileNotFoundError:
            return
        except OSError:
            pass
        try:
            with open(os.path.join(leaf, "cgroup.procs")) as f:
                pids = f.read().split()
            os.makedirs(done, exist_ok=True)
            for pid in pids:
                with contextlib.suppress(OSError), open(os.path.join(done, "cgroup.procs"), "w") as f:
                    f.write(pid)
        except OSError:
            return
