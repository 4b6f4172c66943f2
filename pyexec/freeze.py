"""The freeze window: `with freeze(mounts, timeout=...) as window:`.

Plans the mounts (mounts.plan: once per superblock, each before what it lives on), takes a
lock per superblock (and the Azure extension's freeze lock where it exists), opens the mount
points, starts the thaw guardian (off the critical path), then freezes through the native core,
yields, and thaws in `finally`.  The freeze set's page is the run's journal, a file on tmpfs:
each mount's state is a store into it, so `recover` knows what was ours without any write
inside the window.  Inside the window nothing is written to disk and no module is imported."""
from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import errno
import fcntl
import glob
import itertools
import mmap
import os
import math
import select
import struct
import threading
import time

from collections.abc import Callable

import orjson

from pyexec import errors, mounts, native

RUN_DIR = os.environ.get("PYEXEC_RUN_DIR", "/run/pyexec")  # tmpfs on a normal system: never frozen
GUARDIAN = os.path.join(os.path.dirname(__file__), "pyexec-guardian")
DEFAULT_TIMEOUT = 30.0
MAX_TIMEOUT = 86400.0
DEFAULT_LOCK_WAIT = 0.0
# The Azure VM extension's freeze lock (its fsfreezer.py takes fcntl.lockf on this file): while it is
# held, Azure Backup or Site Recovery is freezing.  Only taken where the directory exists.
AZURE_LOCK_DIR = "/etc/azure/MicrosoftRecoverySvcsSafeFreezeLock"
AZURE_LOCK_FILE = "SafeFreezeLockFile"


def check_timeout(value, what: str = "timeout", zero_ok: bool = False) -> float:
    """value as seconds: a finite number in (0, 86400] ([0, 86400] if zero_ok), else ValueError."""
    try:
        if isinstance(value, bool):  # float(True) is 1.0: a bug in the caller, not a bound
            raise TypeError
        t = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be a number of seconds, not {value!r}") from None
    if not (math.isfinite(t) and (0 <= t if zero_ok else 0 < t) and t <= MAX_TIMEOUT):
        low = "at least 0" if zero_ok else "more than 0"
        raise ValueError(f"{what} must be {low} and at most {MAX_TIMEOUT:g} seconds, not {value!r}")
    return t


def check_paths(paths) -> list[str]:
    """paths as a non-empty list of path strings, else TypeError/ValueError."""
    if isinstance(paths, (str, bytes)) or not hasattr(paths, "__iter__"):
        raise TypeError(f"mount points must be a list of paths, not {type(paths).__name__} {paths!r}")
    out = [os.fsdecode(os.fspath(p)) for p in paths]
    if not out:
        raise ValueError("no mount point to freeze")
    if any(not p.strip() for p in out):  # an unset $VAR: "" would mean the working directory
        raise ValueError(f"an empty mount point in {out!r}")
    return out


@dataclasses.dataclass
class MountResult:
    """One mount of a window: what happened to it and when (CLOCK_MONOTONIC ns)."""

    path: str
    state: str
    freeze_errno: int
    thaw_errno: int
    freeze_start_ns: int
    freeze_end_ns: int
    thaw_start_ns: int
    thaw_end_ns: int
    sync_ns: int


@dataclasses.dataclass
class Window:
    """A freeze window: per-mount stamps, its length, and pyexec's own share of it."""

    paths: list[str]
    backend: str
    expedite: bool
    presync: bool
    timeout_s: float
    mounts: list[MountResult] = dataclasses.field(default_factory=list)
    start_ns: int = 0
    end_ns: int = 0
    frozen_ns: int = 0  # last FIFREEZE done
    thaw_begin_ns: int = 0  # first FITHAW issued
    rcu: str = "untouched"
    guardian: str = "none"
    error: errors.PyexecError | None = None
    deadline_ns: int = 0  # the bound the guardian enforces (CLOCK_MONOTONIC)
    journal: str = ""  # the run journal while the window is open
    _thaw: Callable[[], None] | None = dataclasses.field(default=None, repr=False)

    def thaw_now(self) -> None:
        """Thaw at once, before the with-block ends (the snapshot was abandoned)."""
        if self._thaw is not None:
            self._thaw()

    @property
    def length_ns(self) -> int:
        """First FIFREEZE issued to last FITHAW done."""
        return max(0, self.end_ns - self.start_ns)

    @property
    def ioctl_ns(self) -> int:
        """Time spent inside FIFREEZE/FITHAW calls."""
        return sum((m.freeze_end_ns - m.freeze_start_ns) + (m.thaw_end_ns - m.thaw_start_ns)
                   for m in self.mounts if m.freeze_start_ns)

    @property
    def hold_ns(self) -> int:
        """The caller's time inside the window (the snapshot action)."""
        return max(0, self.thaw_begin_ns - self.frozen_ns) if self.thaw_begin_ns else 0

    @property
    def overhead_ns(self) -> int:
        """Window time that is neither an ioctl nor the caller's: pyexec's own cost."""
        return max(0, self.length_ns - self.ioctl_ns - self.hold_ns)

    def as_dict(self) -> dict:
        """The window as report fields."""
        return {
            "paths": self.paths, "backend": self.backend, "expedite": self.expedite, "presync": self.presync,
            "timeout_s": self.timeout_s, "start_ns": self.start_ns, "end_ns": self.end_ns,
            "length_ns": self.length_ns, "ioctl_ns": self.ioctl_ns, "hold_ns": self.hold_ns,
            "overhead_ns": self.overhead_ns, "rcu_expedited": self.rcu, "guardian": self.guardian,
            "mounts": [dataclasses.asdict(m) for m in self.mounts],
            "error": self.error.as_dict() if self.error else None,
        }


class _Guardian:
    """The guardian process of one window and a thread that thaws if it dies."""

    def __init__(self, nat: native.Native, page, page_fd: int, journal: str):
        self.nat = nat
        self.proc = nat.spawn([GUARDIAN, str(os.getpid()), str(native.life_fd()), journal], {}, path=GUARDIAN,
                              exec_fd=page_fd)
        self.page = page
        self.lost = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="pyexec-guardian-watch", daemon=True)
        self._thread.start()

    def _watch(self):
        p = select.poll()
        p.register(self.proc.pidfd, select.POLLIN)
        p.register(self._stop_r, select.POLLIN)
        for fd, _ in p.poll():
            if fd == self.proc.pidfd:
                self.lost = True
                # px_freeze reads this after each FIFREEZE and undoes what it froze; the thaw
                # here skips a mount whose FIFREEZE is in flight (it would wait behind it).
                if native.read_set(self.page).guardian_state < native.G_FIRED_DEADLINE:
                    native.set_header(self.page, guardian_state=native.G_LOST)
                self.nat.thaw(self.page)
            return

    def stop(self) -> None:
        """End the watch, then the guardian, and reap it."""
        os.write(self._stop_w, b"x")
        self._thread.join()
        with contextlib.suppress(OSError):
            self.nat.kill_tree(self.proc, 0, 5_000_000_000)
        self.proc.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def _wait_ready(page, proc, timeout_s: float = 5.0) -> bool:
    """Wait for the guardian's ready byte on its stdout (or its death, or timeout_s)."""
    p = select.poll()
    p.register(proc.out_fd, select.POLLIN)
    p.register(proc.pidfd, select.POLLIN)
    for fd, _ in p.poll(int(timeout_s * 1000)):
        if fd == proc.out_fd and os.read(proc.out_fd, 1) == b"R":
            break
    return native.read_set(page).guardian_state >= native.G_READY


_IN_CLOSE_WRITE, _IN_CLOSE_NOWRITE = 0x08, 0x10  # linux/inotify.h
_libc = None


def _inotify_close_watch(path: str) -> int:
    """An inotify fd that becomes readable when any open file of path is closed: a lock holder's
    release (flock and lockf locks end with the close of the holder's file)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    fd = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    if fd < 0:
        raise OSError(ctypes.get_errno(), "inotify_init1")
    if _libc.inotify_add_watch(fd, os.fsencode(path), _IN_CLOSE_WRITE | _IN_CLOSE_NOWRITE) < 0:
        e = ctypes.get_errno()
        os.close(fd)
        raise OSError(e, f"inotify_add_watch {path}")
    return fd


def _lock(path: str, what: str, deadline: float, posix: bool = False, shared: bool = False,
          cancel_fd: int = -1) -> int:
    """Take a lock on path (flock, exclusive or shared; or lockf for the Azure lock), waiting until
    deadline (time.monotonic) for its holder to let go: woken by the holder's close or by cancel_fd,
    never by a timer tick.  Returns the fd that holds it; FreezeError 121 naming the holder after
    the deadline, or when cancel_fd becomes readable (a signal)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    watch = -1
    mode = fcntl.LOCK_SH if shared else fcntl.LOCK_EX
    try:
        while True:
            try:
                if posix:
                    fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                else:
                    fcntl.flock(fd, mode | fcntl.LOCK_NB)
                break
            except (BlockingIOError, PermissionError):
                pass
            if watch < 0:  # watch, then try once more: a release between the two is not missed
                watch = _inotify_close_watch(path)
                continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise errors.FreezeError(121, f"{what} is held by pid {_holder(fd, posix)} "
                                         f"(lock {path}); gave up waiting")
            p = select.poll()
            p.register(watch, select.POLLIN)
            if cancel_fd >= 0:
                p.register(cancel_fd, select.POLLIN)
            ready = dict(p.poll(math.ceil(left * 1000)))
            if cancel_fd in ready:
                raise errors.FreezeError(121, f"interrupted while waiting for {what} (held by pid "
                                         f"{_holder(fd, posix)})")
            if ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(watch, 65536)
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
    if posix:  # F_GETLK names the holder of a POSIX lock
        req = struct.pack("hhqqi", fcntl.F_WRLCK, 0, 0, 0, 0)
        with contextlib.suppress(OSError):
            return str(struct.unpack("hhqqi", fcntl.fcntl(fd, fcntl.F_GETLK, req))[4])
        return "?"
    with contextlib.suppress(OSError, ValueError):
        return str(int(os.pread(fd, 32, 0)))
    return "?"


_held_lock = threading.Lock()
_held: dict[str, str] = {}  # superblock (major:minor) → mount point, held by this process


@dataclasses.dataclass
class Held:
    """Mounts planned (in freeze order) and locked for one run: freeze(held) freezes them."""

    mounts: list[mounts.Mount]

    @property
    def paths(self) -> list[str]:
        return [m.mount_point for m in self.mounts]


@contextlib.contextmanager
def hold(paths, lock_wait: float = DEFAULT_LOCK_WAIT, planned: list[mounts.Mount] | None = None,
         cancel_fd: int = -1):
    """Plan paths and lock their superblocks (and the Azure freeze lock where it exists) for the
    block: a run takes this before its pre-scripts, so it never quiesces what it cannot freeze.

    Each superblock to freeze is locked exclusively, each one they live on (a loop image's
    filesystem) shared: a thaw writes through to it, so nobody may freeze it meanwhile, while runs
    on two images of one filesystem go on together.  Runs on other filesystems go on beside it; one
    that needs a held lock waits up to lock_wait seconds (or until cancel_fd is readable), then
    FreezeError 121 names the holder's pid."""
    lock_wait = check_timeout(lock_wait, "lock_wait", zero_ok=True)
    plan = planned if planned is not None else mounts.plan(check_paths(paths))
    devs = [m.dev for m in plan]
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    run_dev = _superblock_of(RUN_DIR)
    if run_dev in devs:
        raise errors.FreezeError(123, f"the run directory {RUN_DIR} is on a filesystem to freeze "
                                 "(set PYEXEC_RUN_DIR to a directory on tmpfs)")
    with _held_lock:
        nested = [_held[d] for d in devs if d in _held]
        if nested:
            raise errors.FreezeError(121, "this process already holds " + ", ".join(nested)
                                     + " frozen: a freeze nested in another freeze of the same filesystem")
        for d, m in zip(devs, plan):
            _held[d] = m.mount_point
    fds: list[int] = []
    try:
        deadline = time.monotonic() + lock_wait
        if os.path.isdir(AZURE_LOCK_DIR):
            fds.append(_lock(os.path.join(AZURE_LOCK_DIR, AZURE_LOCK_FILE), "the Azure extension's freeze lock",
                             deadline, posix=True, cancel_fd=cancel_fd))
        below = {m.dev: m for m in mounts.underneath(plan)}
        wanted = [(m, False) for m in plan] + [(m, True) for d, m in below.items() if d not in devs]
        for m, shared in sorted(wanted, key=lambda w: w[0].dev):  # one global order: runs cannot deadlock
            fds.append(_lock(os.path.join(RUN_DIR, f"sb-{m.dev.replace(':', '-')}.lock"),
                             f"{m.mount_point} (another pyexec run)", deadline, shared=shared,
                             cancel_fd=cancel_fd))
        yield Held(plan)
    finally:
        for fd in fds:
            os.close(fd)
        with _held_lock:
            for d in devs:
                _held.pop(d, None)


def _superblock_of(path: str) -> str | None:
    try:
        return mounts.plan([path])[0].dev
    except errors.PyexecError:
        return None


def journals() -> list[tuple[str, dict, bool]]:
    """Every readable run journal under RUN_DIR: (path, its metadata with "states", whether its
    controller or guardian still runs)."""
    out = []
    size = native.default().set_size
    for j in sorted(glob.glob(os.path.join(RUN_DIR, "window-*.journal"))):
        try:
            with open(j, "rb") as f:
                data = f.read()
            doc = orjson.loads(data[size:].rstrip(b"\0"))
            rec = native.read_set(data[:size])
        except (OSError, ValueError, orjson.JSONDecodeError):
            continue
        doc["states"] = [m.state for m in rec.mounts]
        pids = [p for p in (doc.get("pid"), rec.guardian_pid) if p]
        running = any(p == os.getpid() or _alive(p) for p in pids)
        out.append((j, doc, running))
    return out


def _alive(pid: int) -> bool:
    """Whether pid runs (a zombie, killed but not reaped yet, does not)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            state = f.read().rpartition(b")")[2].split()[0]
    except (OSError, IndexError):
        return False
    return state not in (b"Z", b"X")


def recover(nat: native.Native | None = None) -> tuple[list[str], list[int], bool]:
    """Thaw what dead runs' journals mark as theirs and put rcu_expedited back:
    (paths thawed, pids still running, whether rcu_expedited was restored).

    Only mounts the journal marks frozen (or freezing: killed inside a FIFREEZE, the one
    ambiguous instant) are thawed; a mount another tool froze after the crash is left alone."""
    nat = nat or native.default()
    thawed, alive, rcu = [], [], False
    for j, doc, running in journals():
        if running:
            alive.append(doc.get("pid"))
            continue
        with open(j, "rb") as f:
            page = bytearray(f.read(nat.set_size))
        opened = []
        for i, (p, state) in enumerate(zip(doc.get("paths", []), doc["states"])):
            if state not in ("frozen", "freezing"):
                continue
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError:
                continue
            native.set_mount_fd(page, i, fd)
            opened.append((i, p, fd))
        for i in range(len(doc.get("paths", []))):
            if i not in {o[0] for o in opened}:
                native.set_mount_fd(page, i, -1)
        try:
            nat.thaw(page, native.THAW_IN_FLIGHT)
            rec = native.read_set(page)
            thawed += [p for i, p, _ in opened if rec.mounts[i].state == "thawed" and rec.mounts[i].thaw_errno == 0]
            if rec.rcu_state == "set" and nat.rcu_restore(page) == 0:
                rcu = True
        finally:
            for _, _, fd in opened:
                os.close(fd)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(j)
    return thawed, alive, rcu


RCU_EXPEDITED = "/sys/kernel/rcu_expedited"


def thaw_path(path: str) -> bool:
    """FITHAW path if it is frozen; True if it was (the sandbox's watchdogs: tests and demo)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_FITHAW = 0xC0045878  # _IOWR('X', 120, int), linux/fs.h


_journal_seq = itertools.count()


def journal_path() -> str:
    """A new run journal of this process (a window's freeze set page, then its metadata)."""
    return os.path.join(RUN_DIR, f"window-{os.getpid()}-{next(_journal_seq)}.journal")


class FreezeTimeout(errors.FreezeError):
    """The window outlived its bound: the guardian thawed it (code 122).  .window has the detail."""

    def __init__(self, detail: str, window: "Window"):
        super().__init__(122, detail)
        self.window = window


@contextlib.contextmanager
def freeze(paths, timeout: float = DEFAULT_TIMEOUT, expedite: bool = True, presync: bool = True,
           guardian: bool = True, backend: native.Native | None = None, lock_wait: float = DEFAULT_LOCK_WAIT):
    """Freeze paths (mount points, or a Held from hold()) for the body of the with-block.

    Raises ValueError/TypeError for a bad timeout or paths; FreezeError (121/123) if the freeze
    cannot be done, with nothing left frozen; FreezeTimeout (122) after the block if it outlived
    `timeout` and the guardian thawed it (a snapshot taken then is not consistent).  The guardian
    thaws at `timeout` seconds even if this process hangs or dies."""
    timeout = check_timeout(timeout)
    with contextlib.ExitStack() as stack:
        held = paths if isinstance(paths, Held) else stack.enter_context(hold(paths, lock_wait))
        with window(held.paths, timeout, expedite, presync, guardian, backend) as win:
            yield win


@contextlib.contextmanager
def window(paths: list[str], timeout: float, expedite: bool = True, presync: bool = True,
           guardian: bool = True, backend: native.Native | None = None):
    """The window over paths exactly in the order given, unlocked: freeze() plans and locks first.
    (Tests call it directly to give an order freeze() would refuse.)"""
    nat = backend or native.default()
    win = Window(paths=list(paths), backend=nat.name, expedite=expedite, presync=presync, timeout_s=timeout)
    fds: list[int] = []
    if len(paths) > nat.max_mounts:
        raise errors.FreezeError(121, f"{len(paths)} filesystems: at most {nat.max_mounts} per window")
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [os.close(fd) for fd in fds])
        for p in paths:
            try:
                fds.append(os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC))
            except OSError as err:
                raise errors.FreezeError(123, f"cannot open mount point: {err.strerror}", p, errno=err.errno) from err
        os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
        recover(nat)  # a run killed together with its guardian left its mounts frozen: thaw them first
        journal = win.journal = journal_path()
        page_fd = os.open(journal, os.O_RDWR | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        stack.callback(os.close, page_fd)
        stack.callback(_unlink, journal)
        meta = orjson.dumps({"pid": os.getpid(), "paths": win.paths, "time": time.time()})
        os.ftruncate(page_fd, nat.set_size)
        os.pwrite(page_fd, meta, nat.set_size)
        page = mmap.mmap(page_fd, nat.set_size)
        stack.callback(page.close)
        nat.set_init(page, fds)
        # The bound runs from before the guardian's start: it sleeps on the deadline it reads first.
        win.deadline_ns = nat.now_ns() + int(timeout * 1e9)
        native.set_header(page, controller_pid=os.getpid(), deadline_ns=win.deadline_ns)
        g = None
        if guardian:
            g = _Guardian(nat, page, page_fd, journal)
            stack.callback(g.stop)
            if not _wait_ready(page, g.proc):
                raise errors.FreezeError(121, "the thaw guardian did not start")
            win.guardian = "ready"

        def thaw() -> None:
            win.thaw_begin_ns = win.thaw_begin_ns or nat.now_ns()
            nat.thaw(page)
        win._thaw = thaw
        flags = (native.FREEZE_EXPEDITE if expedite else 0) | (native.FREEZE_PRESYNC if presync else 0)
        rc = nat.freeze(page, flags)
        rec = native.read_set(page)
        _fill(win, rec)
        if rc < 0:
            if rc == -errno.ETIMEDOUT:
                win.error = _guardian_error(rec, g, timeout, win) or FreezeTimeout(
                    f"the {timeout:g}s bound passed while freezing; what was frozen is thawed", win)
            else:
                bad = win.paths[rec.failed_index] if rec.failed_index >= 0 else None
                win.error = errors.freeze_error(-rc, bad)
            raise win.error
        win.frozen_ns = max(m.freeze_end_ns for m in win.mounts)
        ok = False
        try:
            yield win
            ok = True
        finally:
            win._thaw = None
            win.thaw_begin_ns = win.thaw_begin_ns or nat.now_ns()
            trc = nat.thaw(page)
            rec = native.read_set(page)
            _fill(win, rec)
            if g is not None:
                win.guardian = "idle"
            win.error = _guardian_error(rec, g, timeout, win)
            if trc < 0 and trc != -errno.EINVAL and win.error is None:
                win.error = errors.freeze_error(-trc, None, "FITHAW")
        if ok and win.error is not None:
            raise win.error


def _guardian_error(rec: native.SetRecord, g: "_Guardian | None", timeout: float, win: Window):
    """The error a guardian's intervention means for the window, if any; sets win.guardian."""
    if g is None:
        return None
    state = rec.guardian_state
    if state == native.G_FIRED_DEADLINE:
        win.guardian = "fired:deadline"
        return FreezeTimeout(f"the window passed its {timeout:g}s bound and was thawed by the guardian", win)
    if state == native.G_LOST or g.lost:
        win.guardian = "lost"
        return errors.FreezeError(121, "the thaw guardian died, so the filesystems were thawed at once: "
                                  "the window did not hold")
    return None


def _unlink(path: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


def _fill(window: Window, rec: native.SetRecord) -> None:
    window.start_ns = rec.window_start_ns
    # The last thaw that landed ends the window, whoever issued it (the guardian, an early thaw):
    # the controller's final px_thaw may come much later and find nothing left to thaw.
    thawed = [m.thaw_end_ns for m in rec.mounts if m.thaw_end_ns]
    window.end_ns = max(thawed) if thawed else rec.window_end_ns
    window.rcu = rec.rcu_state
    window.mounts = [
        MountResult(path, m.state, m.freeze_errno, m.thaw_errno, m.freeze_start_ns, m.freeze_end_ns,
                    m.thaw_start_ns, m.thaw_end_ns, m.sync_end_ns - m.sync_start_ns)
        for path, m in zip(window.paths, rec.mounts)
    ]
