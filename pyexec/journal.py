"""The run journal: a window's freeze-set page, shared by the controller and the guardian, and the file
in RUN_DIR that `recover` reads (the page, then its metadata: pids and their start times, paths, and
each mount's identity).  Each mount's state is a store into the page, so nothing is written to a disk
inside the window, and `recover` thaws only what a dead run marked ours, still the same filesystem.

Where the page lives decides what `recover` knows after a kill of both controller and guardian:

- RUN_DIR on tmpfs (or ramfs): the page IS the journal file, mapped shared.  A store into it cannot
  block (no disk filesystem behind it, and tmpfs is never frozen), and the file always holds each
  mount's last state: recover thaws exactly the mounts marked frozen (or freezing: killed inside a
  FIFREEZE, the one ambiguous instant), never one another tool froze after the crash.
- RUN_DIR on a disk filesystem (/run is on `/` on some machines): a store into a page of that file
  faults into the filesystem (ext4_page_mkwrite) and blocks forever if it is frozen, by us or by anyone,
  and the guardian with it.  So the page is a memfd (shmem: never a disk filesystem) shared with the
  guardian, and the file gets a copy of it only outside the window: before the first FIFREEZE with
  every mount marked freezing ("maybe ours"), after the last FITHAW as it ended.  recover after a kill
  inside such a window thaws every mount of that run that is still the same filesystem, even one
  another tool froze after the crash (whose FITHAW then answers EINVAL), rather than leave one frozen.
  (`status` reads a live run's page from its memfd, through /proc/<controller>/fd: the file is not
  updated inside the window.)

Either way a mount is thawed only through an fd opened without following a symlink and only if it is
still the filesystem the run froze (mount id, device, inode); one that is not is left frozen and the
journal kept, so that `status` shows it and a later `recover` thaws it once it is visible again.  A
pid in the journal counts as alive only with the start time recorded (a reused pid is not the run)."""
from __future__ import annotations

import contextlib
import glob
import itertools
import mmap
import os
import time
from collections.abc import Collection, Sequence
from typing import TypedDict

import orjson

from pyexec import errors, identity, mounts, native

RUN_DIR = os.environ.get("PYEXEC_RUN_DIR", "/run/pyexec")  # tmpfs on a normal system: never frozen
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"
MEMORY_FS = ("tmpfs", "ramfs")  # filesystems a MAP_SHARED page of cannot block on a freeze
MEMFD_NAME = "pyexec-journal"  # the memfd of a page in memory, as /proc/<pid>/fd shows it


class MountId(TypedDict):
    """One mount's identity as the journal records it (identity.Identity, and mountinfo's major:minor)."""

    mnt_id: int
    st_dev: int
    st_ino: int
    dev: str


class JournalMeta(TypedDict, total=False):
    """A journal's metadata (Journal writes it after the page), with the page's mount states."""

    pid: int
    start: int  # the controller's start time (/proc/<pid>/stat field 22)
    guardian_pid: int
    guardian_start: int
    paths: list[str]
    ids: list[MountId]
    page: str  # "run-dir" (the page is this file) or "memory" (a copy of a memfd)
    page_fd: int  # "memory": the memfd's fd in the controller
    time: float
    states: list[str]


class MountState(TypedDict):
    path: str
    state: str


class RunStatus(TypedDict):
    """One run's entry of status()."""

    pid: int | None
    running: bool
    journal: str
    mounts: list[MountState]


def journals() -> list[tuple[str, JournalMeta, bool]]:
    """Every readable run journal under RUN_DIR: (path, its metadata with "states", whether its
    controller or guardian still runs)."""
    out = []
    size = native.default().set_size
    for j in sorted(glob.glob(os.path.join(RUN_DIR, "window-*.journal"))):
        try:
            with open(j, "rb") as f:
                data = f.read()
        except OSError:
            continue
        try:
            doc: JournalMeta = orjson.loads(data[size:].rstrip(b"\0"))
            rec = native.read_set(data[:size])
        except (ValueError, orjson.JSONDecodeError):
            unwritten = _unwritten(j, data[:size])
            if unwritten is not None:
                out.append(unwritten)
            continue
        # Each pid with its start time: a pid given to another process since (ours included) is not the run.
        pids = [(doc.get("pid"), doc.get("start")),
                (doc.get("guardian_pid") or rec.guardian_pid, doc.get("guardian_start"))]
        running = any(_alive(p, start) for p, start in pids if p)
        if running and doc.get("page") == "memory":
            # The file holds a copy made before the window ("freezing": maybe ours); the live page is
            # the run's memfd, read through its controller's fd table.
            rec = _live_page(doc, size) or rec
        doc["states"] = [m.state for m in rec.mounts]
        out.append((j, doc, running))
    return out


def _unwritten(path: str, page: bytes) -> tuple[str, JournalMeta, bool] | None:
    """A journal its run was killed while making (before its first write: no freeze set in it yet,
    and nothing is frozen before one is): its pid from its name, no mounts; None for any other
    unreadable journal, which is left as it is."""
    try:
        native.read_set(page)
        return None  # a freeze set is there: not one that was never written
    except native.SetVersionError:
        return None  # another pyexec's freeze set: written, but not for this one to read
    except ValueError:  # no magic, or shorter than a freeze set
        pass
    try:
        pid = int(os.path.basename(path).split("-")[1])
    except (IndexError, ValueError):
        return None
    return path, {"pid": pid, "paths": [], "states": []}, _alive(pid)


def _live_page(doc: JournalMeta, size: int) -> native.SetRecord | None:
    """A running run's page, from its memfd (None if it cannot be read: the run just ended)."""
    pid, fd = doc.get("pid"), doc.get("page_fd")
    if not pid or fd is None or not _alive(pid, doc.get("start")):
        return None
    link = f"/proc/{pid}/fd/{fd}"
    with contextlib.suppress(OSError, ValueError):
        if os.readlink(link).startswith("/memfd:" + MEMFD_NAME):
            with open(link, "rb") as f:
                return native.read_set(f.read(size))
    return None


def status() -> list[RunStatus]:
    """What pyexec runs hold frozen now: one entry per journal, with its pid, whether it (or its
    guardian) still runs, and each mount's state."""
    return [{"pid": doc.get("pid"), "running": running, "journal": j,
             "mounts": [{"path": p, "state": st} for p, st in zip(doc.get("paths", []), doc["states"])]}
            for j, doc, running in journals()]


def _stat(pid: int) -> list[bytes]:
    """/proc/<pid>/stat's fields from the third (state) on: the name before them may hold spaces."""
    with open(f"/proc/{pid}/stat", "rb") as f:
        return f.read().rpartition(b")")[2].split()


def start_time(pid: int) -> int:
    """When pid started (proc(5) stat field 22, clock ticks since boot): with the pid, which process it is."""
    return int(_stat(pid)[19])


def _alive(pid: int, start: int | None = None) -> bool:
    """Whether pid runs (a zombie, killed but not reaped yet, does not) and, if start is given, is
    the process that started then (not another one given the same pid since)."""
    try:
        fields = _stat(pid)
        state, started = fields[0], int(fields[19])
    except (OSError, IndexError, ValueError):
        return False
    return state not in (b"Z", b"X") and (start is None or started == start)


def is_running(pid: int, start: int) -> bool:
    """Whether pid runs and is the process that started at start (start_time's ticks)."""
    return _alive(pid, start)


def recover(nat: native.Native | None = None) -> tuple[list[str], list[int], bool]:
    """Thaw what dead runs' journals mark as theirs and put rcu_expedited back:
    (paths thawed, pids still running, whether rcu_expedited was restored).

    Only mounts the journal marks frozen (or freezing: killed inside a FIFREEZE, the one ambiguous
    instant; or every mount, for a page kept in memory, see above) are thawed, each only if its
    path (no symlink followed) is still the filesystem the run froze.  One that is not, but whose
    mount still exists (hidden, or moved), is left frozen and its journal kept for a later recover."""
    nat = nat or native.default()
    thawed: list[str] = []
    alive: list[int] = []
    rcu = False
    for j, doc, running in journals():
        if running:
            pid = doc.get("pid")
            if pid is not None:  # pyexec always writes it; a journal without one names no pid
                alive.append(pid)
            continue
        if not doc.get("paths"):  # never written: it names nothing frozen
            unlink(j)
            continue
        with open(j, "rb") as f:
            page = bytearray(f.read(nat.set_size))
        opened: list[tuple[int, str, int]] = []
        ids = doc.get("ids", [])
        live = identity.by_mnt_id(mounts.read_mountinfo())
        keep = False
        for i, (p, state) in enumerate(zip(doc.get("paths", []), doc["states"])):
            if state not in ("frozen", "freezing") or i >= len(ids):  # no identity recorded: never by path
                continue
            mid = ids[i]
            fd = identity.matches(p, identity.Identity(mid["mnt_id"], mid["st_dev"], mid["st_ino"]))
            if fd is None:
                still = live.get(mid["mnt_id"])
                keep = keep or (still is not None and still.dev == mid["dev"])
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
        if keep:  # what was thawed is marked so in the file; the rest waits for a later recover
            with open(j, "r+b") as f:
                f.write(page[:nat.set_size])
            continue
        with contextlib.suppress(FileNotFoundError):
            os.unlink(j)
    return thawed, alive, rcu


def refuse_run_dir_on(superblock: str | None, frozen: Collection[str | None]) -> None:
    """FreezeError 123 if the run directory's superblock (by identity: of the directory or journal as
    opened) is one of those to freeze."""
    if superblock is not None and superblock in frozen:
        raise errors.FreezeError(123, f"the run directory {RUN_DIR} is on a filesystem to freeze "
                                 "(set PYEXEC_RUN_DIR to a directory on tmpfs)")


_journal_seq = itertools.count()


def journal_path() -> str:
    """A new run journal of this process (a window's freeze set page, then its metadata)."""
    return os.path.join(RUN_DIR, f"window-{os.getpid()}-{next(_journal_seq)}.journal")


def unlink(path: str) -> None:
    """Remove a journal (a missing one is fine: the guardian may have removed it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)


class Journal:
    """One window's journal: the page shared with the guardian (the file itself on tmpfs, a memfd
    elsewhere: see the module's docstring) and the file in RUN_DIR that recover reads."""

    def __init__(self, nat: native.Native, paths: Sequence[str], ids: Sequence[identity.Identity],
                 devs: Sequence[str | None], mountinfo: str | None = None):
        self.path = journal_path()
        self.size = nat.set_size
        self.fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600)
        self.page_fd = -1
        self._meta_len = 0
        try:
            fs = identity.by_mnt_id(mountinfo or mounts.read_mountinfo()).get(identity.mnt_id(self.fd))
            self.superblock = fs.dev if fs else None  # the run directory's, by identity
            self.in_memory = fs is None or fs.fstype not in MEMORY_FS
            self.page_fd = os.memfd_create(MEMFD_NAME, os.MFD_CLOEXEC) if self.in_memory else self.fd
            os.ftruncate(self.page_fd, self.size)
            self.page = mmap.mmap(self.page_fd, self.size)
        except BaseException:
            self._close_fds()
            raise
        self.meta: JournalMeta = {
            "pid": os.getpid(), "start": start_time(os.getpid()), "paths": list(paths),
            "ids": [MountId(mnt_id=i.mnt_id, st_dev=i.st_dev, st_ino=i.st_ino, dev=d or "") for i, d in zip(ids, devs)],
            "page": "memory" if self.in_memory else "run-dir", "time": time.time()}
        if self.in_memory:
            self.meta["page_fd"] = self.page_fd  # where `pyexec status` reads the live page

    def publish(self, armed: bool = False) -> None:
        """Write the metadata and (for a page in memory) a copy of the page to the file; armed: every
        mount marked freezing, for the window about to begin.  Never inside the window."""
        if self.in_memory:
            copy = bytearray(self.page)
            if armed:
                for i in range(native.read_set(copy).n):
                    native.set_mount_state(copy, i, native.MOUNT_STATES.index("freezing"))
            os.pwrite(self.fd, copy, 0)
        meta = orjson.dumps(self.meta)
        if len(meta) < self._meta_len:  # nothing of a longer one left after it (it only grows, in a window)
            os.ftruncate(self.fd, self.size)
        os.pwrite(self.fd, meta, self.size)
        self._meta_len = len(meta)

    def guardian_started(self, pid: int) -> None:
        """Record the guardian's pid and start time (a reused pid is not it)."""
        with contextlib.suppress(OSError, IndexError, ValueError):
            self.meta["guardian_pid"], self.meta["guardian_start"] = pid, start_time(pid)

    def _close_fds(self) -> None:
        if self.page_fd >= 0 and self.page_fd != self.fd:
            os.close(self.page_fd)
        os.close(self.fd)

    def close(self) -> None:
        """Unmap the page, close the files and remove the journal (the window is over)."""
        self.page.close()
        self._close_fds()
        unlink(self.path)
