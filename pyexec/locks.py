"""Who may freeze what: a lock per superblock under the run directory (exclusive for a filesystem to
freeze, shared for one it lives on), the Azure extension's freeze lock, and the mounts this process
holds.  A wait for a held lock is woken by the holder's close (inotify) or a signal, never a timer."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import fcntl
import os
import struct
import threading
from collections.abc import Iterable, Iterator

from pyexec import errors, identity, journal, limits, mounts, waits

# The Azure VM extension's freeze lock (its fsfreezer.py takes fcntl.lockf on this file): while it is
# held, Azure Backup or Site Recovery is freezing.  Only taken where the directory exists.
AZURE_LOCK_DIR = "/etc/azure/MicrosoftRecoverySvcsSafeFreezeLock"
AZURE_LOCK_FILE = "SafeFreezeLockFile"


_IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE = 0x08, 0x10  # linux/inotify.h
_WRLCK_WHOLE_FILE = struct.pack("hhqqi", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)  # struct flock, l_pid 0
_libc: ctypes.CDLL | None = None


def _inotify_close_watch(path: str) -> int:
    """An inotify fd that becomes readable when any open file of path is closed: a lock holder's
    release (flock and lockf locks end with the close of the holder's file)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd: int = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"inotify_add_watch {path}")
    return fd


def _lock(path: str, what: str, deadline_ns: int, posix: bool = False, shared: bool = False,
          cancel_fd: int = -1) -> int:
    """Take a lock on path (flock, exclusive or shared; or an OFD record lock for the Azure lock), waiting until
    deadline_ns (waits: the core's clock) for its holder to let go: woken by the holder's close or by
    cancel_fd, never by a timer tick.  Returns the fd that holds it; FreezeError 121 naming the holder
    after the deadline, or when cancel_fd becomes readable (a signal)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    watch = -1
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    expired = False
    try:
        while True:
            try:
                if posix:
                    # An open file description lock (fcntl(2), Linux 3.15): it conflicts with the
                    # extension's lockf as a POSIX lock does, and also with another thread of this
                    # process, and no close of another fd of the file drops it (a POSIX lock is the
                    # whole process's: a second thread would take it at once and drop it at its close).
                    fcntl.fcntl(fd, fcntl.F_OFD_SETLK, _WRLCK_WHOLE_FILE)
                else:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                pass
            if watch < 0:  # watch, then try once more: a release between the two is not missed
                watch = _inotify_close_watch(path)
                continue
            if expired:  # tried once more after the deadline
                raise errors.FreezeError(121, f"{what} is held by pid {_holder(fd, posix)} "
                                         f"(lock {path}); gave up waiting")
            ready = waits.wait_readable([watch], deadline_ns, cancel_fd)
            if cancel_fd in ready:
                raise errors.FreezeError(121, f"interrupted while waiting for {what} (held by pid "
                                         f"{_holder(fd, posix)})")
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(watch, 65536)
            expired = not ready
        if not posix and not shared:
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        return fd
    except BaseException:
        os.close(fd)
        raise
    finally:
        if watch >= 0:
            os.close(watch)


def _holder(fd: int, posix: bool) -> str:
    if posix:  # F_OFD_GETLK names the holder of a POSIX lock (an OFD lock's is -1: no one process)
        with contextlib.suppress(OSError):
            pid = struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_OFD_GETLK, _WRLCK_WHOLE_FILE))[4]
            return str(pid) if pid > 0 else "another pyexec run"
        return "?"
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0)))
    return "?"


_held_lock = threading.Lock()
# (thread, superblock major:minor) → mount point: what each thread of this process holds.  Another
# thread's hold is waited for on the flock like another process's; only a thread's own is a nesting.
_held: dict[tuple[int, str], str] = {}


@dataclasses.dataclass
class Held:
    """Mounts planned (in freeze order) and locked for one run, each opened once (fds, ids): freeze(held)
    freezes them through these fds, never through their paths again."""

    mounts: list[mounts.Mount]
    fds: list[int] = dataclasses.field(default_factory=list)
    ids: list[identity.Identity] = dataclasses.field(default_factory=list)

    @property
    def paths(self) -> list[str]:
        return [m.mount_point for m in self.mounts]


@contextlib.contextmanager
def hold(paths: Iterable[limits.Path] | None, lock_wait: float = limits.DEFAULT_LOCK_WAIT,
         planned: list[mounts.Mount] | None = None, cancel_fd: int = -1) -> Iterator[Held]:
    """Plan paths and lock their superblocks (and the Azure freeze lock where it exists) for the
    block: a run takes this before its pre-scripts, so it never quiesces what it cannot freeze.
    Each mount point is opened here, once, no symlink followed, and checked to be the root of the
    mount mountinfo named (FreezeError 123 otherwise); the fds are held until the block ends.

    Each superblock to freeze is locked exclusively, each one they live on (a loop image's
    filesystem) shared: a thaw writes through to it, so nobody may freeze it meanwhile, while runs
    on two images of one filesystem go on together.  Runs on other filesystems go on beside it; one
    that needs a held lock waits up to lock_wait seconds (or until cancel_fd is readable), then
    FreezeError 121 names the holder's pid."""
    lock_wait = limits.check_timeout(lock_wait, "lock_wait", zero_ok=True)
    text = mounts.read_mountinfo()  # once, for the plan, the run directory and what lies beneath
    plan = planned if planned is not None else mounts.plan(limits.check_paths(paths), text)
    devs = [m.dev for m in plan]
    os.makedirs(journal.RUN_DIR, mode=0o700, exist_ok=True)
    # By identity, not path: the superblock of the run directory as opened, by its mount id.
    run_fd = os.open(journal.RUN_DIR, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        run_sb = identity.superblock(run_fd, text)
    finally:
        os.close(run_fd)
    journal.refuse_run_dir_on(run_sb, devs)
    me = threading.get_ident()
    with _held_lock:
        nested = [_held[(me, d)] for d in devs if (me, d) in _held]
        if nested:
            raise errors.FreezeError(121, "this thread already holds " + ", ".join(nested)
                                     + " frozen: a freeze nested in another freeze of the same filesystem")
        for d, m in zip(devs, plan):
            _held[(me, d)] = m.mount_point
    fds: list[int] = []
    held = Held(plan)
    try:
        for m in plan:
            fd, ident = identity.open_mount(m)
            held.fds.append(fd)
            held.ids.append(ident)
        deadline = waits.deadline_after(lock_wait)
        if os.path.isdir(AZURE_LOCK_DIR):
            fds.append(_lock(os.path.join(AZURE_LOCK_DIR, AZURE_LOCK_FILE), "the Azure extension's freeze lock",
                             deadline, posix=True, cancel_fd=cancel_fd))
        below = {m.dev: m for m in mounts.underneath(plan, text)}
        wanted = [(m, False) for m in plan] + [(m, True) for d, m in below.items() if d not in devs]
        for m, shared in sorted(wanted, key=lambda w: w[0].dev):  # one global order: runs cannot deadlock
            fds.append(_lock(os.path.join(journal.RUN_DIR, f"sb-{m.dev.replace(':', '-')}.lock"),
                             f"{m.mount_point} (another pyexec run)", deadline, shared=shared,
                             cancel_fd=cancel_fd))
        yield held
    finally:
        for fd in fds + held.fds:
            os.close(fd)
        with _held_lock:
            for d in devs:
                _held.pop((me, d), None)
