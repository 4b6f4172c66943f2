"""What the sandbox's two database servers share: the run directory (socket and log on tmpfs), the
OS user's directories, the context manager, the teardown, and how one start went (`Startup`)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import pwd
import re
import shutil
import tempfile
import time
from types import TracebackType
from typing import Self

from pyexec.demo import safeio
from pyexec.demo.processes import Proc, kill_tree

START_TIMEOUT_S = 60.0  # a crash recovery of a sandbox-sized log takes well under a second
STOP_TIMEOUT_S = 30.0  # per escalation step: clean, then hard, then SIGKILL
LOG_KEPT = 64 << 10  # the tail of the server log kept in memory after its run directory is gone


class ServerError(RuntimeError):
    """A sandbox database server could not be set up, started or queried."""


@dataclasses.dataclass
class Startup:
    """How one start went: its wall time and what the engine's crash recovery replayed."""

    seconds: float  # from start() to a server that accepts connections
    recovered: bool  # the engine replayed its log (the directory was not shut down cleanly)
    redo_start: str | None = None  # PostgreSQL: LSN "X/Y"; InnoDB: checkpoint LSN
    redo_end: str | None = None
    redo_bytes: int | None = None  # redo_end - redo_start
    redo_seconds: float | None = None  # the engine's own figure, where its log gives one
    log: list[str] = dataclasses.field(default_factory=list)  # the recovery lines of the server log
    # PostgreSQL's archive recovery from a backup_label (start_archive_recovery):
    archive_recovery: bool = False
    backup_end: str | None = None  # "completed backup recovery with … end LSN": the backup's stop LSN
    consistent_at: str | None = None  # "consistent recovery state reached at" this LSN
    stopped: str | None = None  # why recovery stopped ("recovery stopping after reaching consistency")
    timeline: int | None = None  # the new timeline of the promoted copy
    restored_files: int = 0  # WAL segments (and history files) restore_command fetched from the archive
    promoted: bool = False  # recovery ended and the server accepts read-write connections


def find_tools(what: str, tools: tuple[str, ...]) -> dict[str, str]:
    """Each tool's path on PATH (or in /usr/sbin, /usr/bin), or ServerError naming the missing ones."""
    # root's PATH lacks /usr/sbin under some sudo and container setups; mariadbd lives there.
    found = {t: shutil.which(t, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin") for t in tools}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise ServerError(f"{what} tools not found ({', '.join(missing)}): run scripts/setup.sh")
    return {t: p for t, p in found.items() if p is not None}


def _run_dir() -> str:
    # The server log and socket must stay writable while the data filesystems are frozen, so they
    # live on tmpfs (/run), never next to the data.
    base = "/run" if os.access("/run", os.W_OK) else None
    return tempfile.mkdtemp(prefix="pyexec-db-", dir=base)


def owner(user: str) -> tuple[int, int]:
    """The OS user's uid and gid, or ServerError."""
    try:
        pw = pwd.getpwnam(user)
    except KeyError as err:
        raise ServerError(f"no OS user {user!r}: run scripts/setup.sh") from err
    return pw.pw_uid, pw.pw_gid


def check_reachable(path: str, user: str, uid: int, gid: int) -> None:
    """ServerError unless every directory above path lets uid/gid through (search permission)."""
    d = os.path.dirname(os.path.abspath(path))
    while True:
        st = os.stat(d)
        bit = 0o100 if st.st_uid == uid else 0o010 if st.st_gid == gid else 0o001
        if not st.st_mode & bit:
            # pytest's tmp_path (/tmp/pytest-of-root/..., 0700) is the usual culprit.
            raise ServerError(f"{path}: the OS user {user} cannot reach it ({d} is mode "
                              f"{st.st_mode & 0o777:o}); put it under a directory it can search")
        if d == "/":
            return
        d = os.path.dirname(d)


def read_from(path: str, offset: int) -> str:
    """The text of the file path from offset on ("" if it cannot be read)."""
    # The server log lies in the OS user's run directory: read by root, never through a symlink
    # (it would put the file it names into an error message).
    try:
        with safeio.directory(os.path.dirname(path)) as d:
            return safeio.read_at(d, os.path.basename(path))[offset:].decode(errors="replace")
    except OSError:
        return ""


def recovery_lines(log: str, pattern: str) -> list[str]:
    """The lines of log that pattern finds (re.search): what a Startup keeps of the server log."""
    return [ln for ln in log.splitlines() if re.search(pattern, ln)]


def file_size(path: str) -> int:
    """The size of the file path (0 if there is none)."""
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


class Server:
    """What both engines share: the run directory, the context manager, the teardown."""

    engine = ""
    _RECOVERY_LINES = ""  # a pattern of recovery_lines: the server log's lines of a start

    def __init__(self, datadir: str, sockdir: str | None):
        self.datadir = os.path.abspath(datadir)
        self._given_sockdir = sockdir
        self.rundir: str | None = None
        self.sockdir: str | None = None
        self.proc: Proc | None = None
        self.startup: Startup | None = None
        self.log = ""  # the server log of the last run, kept after stop()

    @property
    def running(self) -> bool:
        """True while the server process lives."""
        return self.proc is not None and self.proc.alive()

    def _make_rundir(self, uid: int, gid: int, user: str) -> None:
        for d in (self.datadir, *self._other_dirs(), self._given_sockdir):
            if d:
                check_reachable(d, user, uid, gid)
        self.rundir = _run_dir()
        safeio.own_dir(self.rundir, uid, gid, 0o750)
        self.sockdir = self._given_sockdir or self.rundir
        if self._given_sockdir:
            safeio.own_dir(self._given_sockdir, uid, gid, 0o755)

    def _logfile(self) -> str:
        assert self.rundir is not None
        return os.path.join(self.rundir, f"{self.engine}.log")

    def _cleanup(self) -> None:
        if self.rundir is not None:
            log = read_from(self._logfile(), 0)
            if log:
                self.log = log[-LOG_KEPT:]
            shutil.rmtree(self.rundir, ignore_errors=True)
            self.rundir = None
        if self._given_sockdir:
            # Through the directory's fd: the OS user owns it, and a symlink put in its place would
            # make root unlink those names in the directory it points at.
            with contextlib.suppress(OSError), safeio.directory(self._given_sockdir) as d:
                for name in self._socket_names():
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(name, dir_fd=d)
        self.sockdir = None
        if self.proc is not None:
            self.proc.close()
            self.proc = None

    def _socket_names(self) -> list[str]:
        return []

    def _other_dirs(self) -> list[str]:
        return []

    def stop(self) -> None:
        """Stop the server (clean, then harder, then SIGKILL) and remove its run directory."""
        try:
            if self.running:
                self._stop()
        finally:
            if self.proc is not None and self.proc.alive():
                kill_tree(self.proc)
            self._cleanup()

    def _stop(self) -> None:
        raise NotImplementedError

    def kill(self) -> None:
        """SIGKILL the server and its workers (a crash, for recovery tests), then clean up."""
        if self.proc is not None:
            kill_tree(self.proc)
        self.stop()

    def _started(self, log: str, offset: int, t0: float) -> Startup:
        """The start begun at t0 (time.monotonic()) as the server log from offset on tells it; kept."""
        text = read_from(log, offset)
        self.startup = Startup(seconds=time.monotonic() - t0, recovered=False,
                               log=recovery_lines(text, self._RECOVERY_LINES))
        self._read_recovery(text, self.startup)
        return self.startup

    def _read_recovery(self, log: str, s: Startup) -> None:
        """Fill s with what the engine's log says its recovery replayed."""
        raise NotImplementedError

    def _fail(self, what: str, detail: str = "") -> ServerError:
        tail = read_from(self._logfile(), 0)[-2000:] if self.rundir else ""
        return ServerError(f"{self.engine}: {what}" + (f": {detail}" if detail else "")
                           + (f"\n--- server log ---\n{tail}" if tail else ""))

    def __enter__(self) -> Self:
        if not self.running:
            self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, existing: bool | None = None) -> Startup:
        """Start the server; see the engine's class."""
        raise NotImplementedError
