"""The freeze window: `with freeze(mounts, timeout=...) as window:`.

Plans the mounts (mounts.plan: once per superblock, each before what it lives on), takes their locks
and opens each mount point once (locks.hold, identity.py); after the pre-scripts re-checks that each
mount is still where it was planned, starts the thaw guardian (off the critical path), then freezes
through the held fds in the native core, yields, and thaws in `finally`.  The freeze set's page is the run journal's
(journal.py).  Inside the window nothing is written to disk and no module is imported."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Callable, Iterable, Iterator
from typing import TypedDict

from pyexec import errors, identity, journal, limits, locks, mounts, native
from pyexec.guardian import Guardian, wait_ready


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


class WindowDict(TypedDict):
    """A Window as report fields."""

    paths: list[str]
    backend: str
    expedite: bool
    presync: bool
    timeout_s: float
    start_ns: int
    end_ns: int
    length_ns: int
    ioctl_ns: int
    hold_ns: int
    overhead_ns: int
    rcu_expedited: str
    guardian: str
    journal_page: str
    mounts: list[dict[str, int | str]]  # MountResult's fields
    error: errors.ErrorDict | None


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
    page: str = ""  # where its page lived: "run-dir" (the journal file, tmpfs) or "memory" (a memfd)
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

    def as_dict(self) -> WindowDict:
        """The window as report fields."""
        return {
            "paths": self.paths, "backend": self.backend, "expedite": self.expedite, "presync": self.presync,
            "timeout_s": self.timeout_s, "start_ns": self.start_ns, "end_ns": self.end_ns,
            "length_ns": self.length_ns, "ioctl_ns": self.ioctl_ns, "hold_ns": self.hold_ns,
            "overhead_ns": self.overhead_ns, "rcu_expedited": self.rcu, "guardian": self.guardian,
            "journal_page": self.page,
            "mounts": [dataclasses.asdict(m) for m in self.mounts],
            "error": self.error.as_dict() if self.error else None,
        }


class Timeout(errors.FreezeTimeout):
    """The window outlived its bound and was thawed by force (122), with the window it ended."""

    def __init__(self, detail: str, window: Window):
        super().__init__(detail)
        self.window = window


@contextlib.contextmanager
def freeze(paths: Iterable[limits.Path] | locks.Held, timeout: float = limits.DEFAULT_TIMEOUT, expedite: bool = True,
           presync: bool = True, guardian: bool = True, backend: native.Native | None = None,
           lock_wait: float = limits.DEFAULT_LOCK_WAIT, hold: bool = False) -> Iterator[Window]:
    """Freeze paths (mount points, or a Held from hold()) for the body of the with-block.

    hold: if this process dies inside the window, the guardian holds it to `timeout` instead of
    thawing at once (a group run's host: only a decision or its deadline may end its window).

    Raises ValueError/TypeError for a bad timeout or paths; FreezeError (121/123) if the freeze
    cannot be done, with nothing left frozen (123: a mount point no longer the mount planned);
    FreezeTimeout (122) after the block if it outlived `timeout` and the guardian thawed it, and
    FreezeError 121 if another thawed a filesystem inside it (a snapshot taken then is not
    consistent).  The guardian thaws at `timeout` seconds even if this process hangs or dies."""
    timeout = limits.check_timeout(timeout)
    with contextlib.ExitStack() as stack:
        held = paths if isinstance(paths, locks.Held) else stack.enter_context(locks.hold(paths, lock_wait))
        with window(held, timeout, expedite, presync, guardian, backend, hold) as win:
            yield win


def _open(paths: list[str], stack: contextlib.ExitStack) -> tuple[list[int], list[identity.Identity]]:
    """Open paths as window() is given them directly (no plan): each once, no symlink followed."""
    fds: list[int] = []
    ids: list[identity.Identity] = []

    @stack.callback
    def close_fds() -> None:
        for fd in fds:
            os.close(fd)
    for p in paths:
        fds.append(identity.open_dir(p))
        ids.append(identity.of_fd(fds[-1]))
    return fds, ids


@contextlib.contextmanager
def window(paths: list[str] | locks.Held, timeout: float, expedite: bool = True, presync: bool = True,
           guardian: bool = True, backend: native.Native | None = None, hold: bool = False) -> Iterator[Window]:
    """The window over a Held's mounts (through the fds it opened when planning), or over paths exactly
    in the order given and unlocked: freeze() plans and locks first.  (Tests call it with paths to
    give an order freeze() would refuse.)"""
    nat = backend or native.default()
    held = paths if isinstance(paths, locks.Held) else None
    names = held.paths if held is not None else list(paths)  # type: ignore[arg-type]
    win = Window(paths=names, backend=nat.name, expedite=expedite, presync=presync, timeout_s=timeout)
    if len(names) > nat.max_mounts:
        raise errors.FreezeError(121, f"{len(names)} filesystems: at most {nat.max_mounts} per window")
    with contextlib.ExitStack() as stack:
        fds, ids = (held.fds, held.ids) if held is not None else _open(names, stack)
        os.makedirs(journal.RUN_DIR, mode=0o700, exist_ok=True)
        journal.recover(nat)  # a run killed together with its guardian left its mounts frozen: thaw them first
        # After the pre-scripts, before anything of the window: each mount still where it was planned.
        # (The freeze goes through the held fds whatever a path names later; this refuses a run whose
        # paths were swapped meanwhile instead of calling it consistent.)
        text = mounts.read_mountinfo()
        for m in held.mounts if held is not None else []:
            identity.recheck(m, text)
        devs = [identity.superblock(fd, text) for fd in fds]
        jr = journal.Journal(nat, names, ids, devs, text)
        stack.callback(jr.close)
        journal.refuse_run_dir_on(jr.superblock, devs)
        win.journal, win.page = jr.path, "memory" if jr.in_memory else "run-dir"
        page = jr.page
        nat.set_init(page, fds)
        jr.publish()
        # The bound runs from before the guardian's start: it sleeps on the deadline it reads first.
        win.deadline_ns = nat.now_ns() + native.ns_from_s(timeout)
        native.set_header(page, controller_pid=os.getpid(), deadline_ns=win.deadline_ns)
        g = None
        if guardian:
            g = Guardian(nat, page, jr.page_fd, jr.path)
            stack.callback(g.stop)
            if not wait_ready(page, g.proc):
                raise errors.FreezeError(121, "the thaw guardian did not start")
            win.guardian = "ready"
            jr.guardian_started(g.proc.pid)
        jr.publish(armed=True)

        def thaw() -> None:
            win.thaw_begin_ns = win.thaw_begin_ns or nat.now_ns()
            nat.thaw(page)
        win._thaw = thaw
        flags = (native.FREEZE_EXPEDITE if expedite else 0) | (native.FREEZE_PRESYNC if presync else 0) | \
            (native.FREEZE_HOLD if hold else 0)
        rc = nat.freeze(page, flags)
        rec = native.read_set(page)
        _fill(win, rec)
        if rc < 0:
            jr.publish()
            if errors.timed_out(rc):
                win.error = _guardian_error(rec, g, timeout, win) or Timeout(
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
            jr.publish()
            _fill(win, rec)
            if g is not None:
                win.guardian = "idle"
            win.error = _guardian_error(rec, g, timeout, win) or _thawed_by_another(rec, win)
            if trc < 0 and not errors.not_frozen(-trc) and win.error is None:
                win.error = errors.freeze_error(-trc, None, "FITHAW")
        if ok and win.error is not None:
            raise win.error


def _thawed_by_another(rec: native.SetRecord, win: Window) -> errors.FreezeError | None:
    """A mount our thaw found thawed already (FITHAW: EINVAL) when no guardian of ours thawed it: someone
    else thawed it inside the window, so the window did not hold (the snapshot is not consistent)."""
    lost = [p for p, m in zip(win.paths, rec.mounts) if errors.not_frozen(m.thaw_errno)]
    return errors.thawed_by_another(lost) if lost else None


def _guardian_error(rec: native.SetRecord, g: Guardian | None, timeout: float,
                    win: Window) -> errors.FreezeError | None:
    """The error a guardian's intervention means for the window, if any; sets win.guardian."""
    if g is None:
        return None
    state = rec.guardian_state
    if state == native.G_FIRED_DEADLINE:
        win.guardian = "fired:deadline"
        return Timeout(f"the window passed its {timeout:g}s bound and was thawed by the guardian", win)
    if state == native.G_LOST or g.lost:
        win.guardian = "lost"
        return errors.FreezeError(121, "the thaw guardian died, so the filesystems were thawed at once: "
                                  "the window did not hold")
    return None


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
