"""The run journal: a window's freeze-set page, a file on tmpfs (RUN_DIR) mapped into the controller
and the guardian, followed by its metadata (pid, paths).  Each mount's state is a store into it, so
nothing is written to a disk inside the window, and `recover` thaws only what a dead run marked ours."""
from __future__ import annotations

import contextlib
import glob
import itertools
import os
from typing import TypedDict

import orjson

from pyexec import native

RUN_DIR = os.environ.get("PYEXEC_RUN_DIR", "/run/pyexec")  # tmpfs on a normal system: never frozen
RCU_EXPEDITED = "/sys/kernel/rcu_expedited"


class JournalMeta(TypedDict):
    """A journal's metadata (window.py writes it after the page), with the page's mount states."""

    pid: int
    paths: list[str]
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
            doc: JournalMeta = orjson.loads(data[size:].rstrip(b"\0"))
            rec = native.read_set(data[:size])
        except (OSError, ValueError, orjson.JSONDecodeError):
            continue
        doc["states"] = [m.state for m in rec.mounts]
        pids = [p for p in (doc.get("pid"), rec.guardian_pid) if p]
        running = any(p == os.getpid() or _alive(p) for p in pids)
        out.append((j, doc, running))
    return out


def status() -> list[RunStatus]:
    """What pyexec runs hold frozen now: one entry per journal, with its pid, whether it (or its
    guardian) still runs, and each mount's state."""
    return [{"pid": doc.get("pid"), "running": running, "journal": j,
             "mounts": [{"path": p, "state": st} for p, st in zip(doc.get("paths", []), doc["states"])]}
            for j, doc, running in journals()]


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
    thawed: list[str] = []
    alive: list[int] = []
    rcu = False
    for j, doc, running in journals():
        if running:
            pid = doc.get("pid")
            if pid is not None:  # pyexec always writes it; a journal without one names no pid
                alive.append(pid)
            continue
        with open(j, "rb") as f:
            page = bytearray(f.read(nat.set_size))
        opened: list[tuple[int, str, int]] = []
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


_journal_seq = itertools.count()


def journal_path() -> str:
    """A new run journal of this process (a window's freeze set page, then its metadata)."""
    return os.path.join(RUN_DIR, f"window-{os.getpid()}-{next(_journal_seq)}.journal")


def unlink(path: str) -> None:
    """Remove a journal (a missing one is fine: the guardian may have removed it)."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(path)
