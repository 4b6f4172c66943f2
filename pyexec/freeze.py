"""The freeze window: `with freeze(mounts, timeout=...) as window:`.

Opens the mount points, dedupes superblocks, takes the run lock, starts the thaw guardian
(off the critical path), then freezes through the native core, yields, and thaws in
`finally`.  Inside the window nothing is written to disk and no module is imported."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import glob
import mmap
import os
import select
import sys
import threading
import time

import orjson

from pyexec import errors, native

RUN_DIR = os.environ.get("PYEXEC_RUN_DIR", "/run/pyexec")  # tmpfs on a normal system: never frozen
GUARDIAN = os.path.join(os.path.dirname(__file__), "pyexec-guardian")
G_READY, G_FIRED_DEADLINE, G_FIRED_DIED = 1, 2, 3
DEFAULT_TIMEOUT = 30.0


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

    def __init__(self, nat: native.Native, page, memfd: int, on_death):
        self.nat = nat
        self.proc = nat.spawn([GUARDIAN, str(os.getpid()), _journal_path()], {}, path=GUARDIAN, exec_fd=memfd)
        self.page = page
        self.lost = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._on_death = on_death
        self._thread = threading.Thread(target=self._watch, name="pyexec-guardian-watch", daemon=True)
        self._thread.start()

    def _watch(self):
        p = select.poll()
        p.register(self.proc.pidfd, select.POLLIN)
        p.register(self._stop_r, select.POLLIN)
        for fd, _ in p.poll():
            if fd == self.proc.pidfd:
                self.lost = True
                self._on_death()
                return
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
    return native.read_set(page).guardian_state >= G_READY


@contextlib.contextmanager
def _run_lock(wait_s: float):
    os.makedirs(RUN_DIR, mode=0o700, exist_ok=True)
    fd = os.open(os.path.join(RUN_DIR, "lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o600)
    try:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise errors.FreezeError(121, "another pyexec run holds the freeze lock "
                                             f"({os.path.join(RUN_DIR, 'lock')})") from None
                time.sleep(0.01)
        yield
    finally:
        os.close(fd)


RCU_EXPEDITED = "/sys/kernel/rcu_expedited"


def _read_rcu() -> str | None:
    with contextlib.suppress(OSError), open(RCU_EXPEDITED) as f:
        return f.read().strip()
    return None


def journals() -> list[tuple[str, dict, bool]]:
    """Every readable journal under RUN_DIR: (path, document, whether its pid still runs)."""
    out = []
    for j in sorted(glob.glob(os.path.join(RUN_DIR, "journal-*.json"))):
        try:
            with open(j, "rb") as f:
                doc = orjson.loads(f.read())
        except (OSError, orjson.JSONDecodeError):
            continue
        pid = doc.get("pid")
        out.append((j, doc, pid == os.getpid() or os.path.exists(f"/proc/{pid}")))
    return out


def recover() -> tuple[list[str], list[int], bool]:
    """Thaw what dead runs' journals say they froze and put rcu_expedited back:
    (paths thawed, pids still running, whether rcu_expedited was restored)."""
    thawed, alive, rcu = [], [], False
    for j, doc, running in journals():
        if running:
            alive.append(doc.get("pid"))
            continue
        for p in doc.get("paths", []):
            with contextlib.suppress(OSError):
                if thaw_path(p):
                    thawed.append(p)
        if doc.get("rcu_expedited_before") == "0" and _read_rcu() == "1":
            with contextlib.suppress(OSError), open(RCU_EXPEDITED, "w") as f:
                f.write("0")
                rcu = True
        with contextlib.suppress(FileNotFoundError):
            os.unlink(j)
    return thawed, alive, rcu


def thaw_path(path: str) -> bool:
    """FITHAW path if it is frozen; True if it was."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        fcntl.ioctl(fd, _FITHAW, 0)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


_FITHAW = 0xC0045878  # _IOWR('X', 120, int), linux/fs.h


def _journal_path() -> str:
    return os.path.join(RUN_DIR, f"journal-{os.getpid()}.json")


def _write_journal(window: Window, state: str) -> None:
    # The value before we expedite, for `recover` if both we and the guardian die in the window.
    doc = {"pid": os.getpid(), "state": state, "paths": window.paths, "time": time.time(),
           "rcu_expedited_before": _read_rcu() if window.expedite else None}
    tmp = _journal_path() + ".tmp"
    with open(tmp, "wb") as f:
        f.write(orjson.dumps(doc))
    os.replace(tmp, _journal_path())


@contextlib.contextmanager
def freeze(paths, timeout: float = DEFAULT_TIMEOUT, expedite: bool = True, presync: bool = True,
           guardian: bool = True, backend: native.Native | None = None, lock_wait: float = 0.0):
    """Freeze paths (mount points, in freeze order) for the body of the with-block.

    Raises a FreezeError (121/123) if the freeze cannot be done; nothing is left frozen.
    The guardian thaws everything at `timeout` seconds even if this process hangs or dies."""
    nat = backend or native.default()
    paths = [os.fspath(p) for p in paths]
    window = Window(paths=[], backend=nat.name, expedite=expedite, presync=presync, timeout_s=timeout)
    fds: list[int] = []
    with contextlib.ExitStack() as stack:
        stack.callback(lambda: [os.close(fd) for fd in fds])
        seen = set()
        for p in paths:
            try:
                fd = os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            except OSError as err:
                raise errors.FreezeError(123, f"cannot open mount point: {err.strerror}", p, errno=err.errno) from err
            st = os.fstat(fd)
            if st.st_dev in seen:  # a second FIFREEZE of one superblock would say EBUSY for our own freeze
                os.close(fd)
                continue
            seen.add(st.st_dev)
            fds.append(fd)
            window.paths.append(p)
        if len(fds) > nat.max_mounts:
            raise errors.FreezeError(123, f"{len(fds)} mounts: at most {nat.max_mounts} per window")
        stack.enter_context(_run_lock(lock_wait))
        recover()  # a run killed together with its guardian left its mounts frozen: thaw them first
        memfd = os.memfd_create("pyexec-window", os.MFD_CLOEXEC)
        stack.callback(os.close, memfd)
        os.ftruncate(memfd, nat.set_size)
        page = mmap.mmap(memfd, nat.set_size)
        stack.callback(page.close)
        nat.set_init(page, fds)
        # controller pid and the guardian's deadline live in the header (see pyexec_core.h).
        _set_header_int(page, "controller_pid", os.getpid())
        _set_header_int(page, "deadline_ns", nat.now_ns() + int(timeout * 1e9))
        g = None
        if guardian:
            g = _Guardian(nat, page, memfd, on_death=lambda: nat.thaw(page))
            stack.callback(g.stop)
            if not _wait_ready(page, g.proc):
                raise errors.FreezeError(121, "the thaw guardian did not start")
            window.guardian = "ready"
        _write_journal(window, "freezing")
        stack.callback(_remove_journal)
        flags = (native.FREEZE_EXPEDITE if expedite else 0) | (native.FREEZE_PRESYNC if presync else 0)
        rc = nat.freeze(page, flags)
        rec = native.read_set(page)
        _fill(window, rec)
        if rc < 0:
            bad = window.paths[rec.failed_index] if rec.failed_index >= 0 else None
            window.error = errors.freeze_error(-rc, bad)
            raise window.error
        window.frozen_ns = max(m.freeze_end_ns for m in window.mounts)
        try:
            yield window
        finally:
            window.thaw_begin_ns = nat.now_ns()
            trc = nat.thaw(page)
            rec = native.read_set(page)
            _fill(window, rec)
            if g is not None:
                state = rec.guardian_state
                window.guardian = {G_FIRED_DEADLINE: "fired:deadline", G_FIRED_DIED: "fired:controller-died"}.get(
                    state, "lost" if g.lost else "idle")
                if state == G_FIRED_DEADLINE:
                    window.error = errors.FreezeError(122, f"the window passed its {timeout}s bound and was "
                                                      "thawed by the guardian")
            if trc < 0 and trc != -errno.EINVAL and window.error is None:
                window.error = errors.freeze_error(-trc, None, "FITHAW")


def _remove_journal():
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_journal_path())


# Offsets of header fields in px_set (see pyexec_core.h; checked by native.Native's size check).
_HEADER_OFFSETS = {"controller_pid": 36, "deadline_ns": 48}


def _set_header_int(page, field: str, value: int) -> None:
    off = _HEADER_OFFSETS[field]
    size = 8 if field.endswith("_ns") else 4
    page[off:off + size] = value.to_bytes(size, sys.byteorder, signed=True)


def _fill(window: Window, rec: native.SetRecord) -> None:
    window.start_ns = rec.window_start_ns
    window.end_ns = rec.window_end_ns
    window.rcu = rec.rcu_state
    window.mounts = [
        MountResult(path, m.state, m.freeze_errno, m.thaw_errno, m.freeze_start_ns, m.freeze_end_ns,
                    m.thaw_start_ns, m.thaw_end_ns, m.sync_end_ns - m.sync_start_ns)
        for path, m in zip(window.paths, rec.mounts)
    ]
