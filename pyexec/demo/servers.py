"""Private PostgreSQL and MariaDB instances in the sandbox: the real servers the database quiescers
are tested and demonstrated against.

Each instance is one data directory (and, optionally, a second directory on another filesystem for
the write-ahead log: PostgreSQL's pg_wal, MariaDB's binlog and InnoDB redo log), reached only over a
Unix socket in a private run directory; neither server listens on TCP.  `stop()` and the context
managers leave no server process, socket or run directory behind, whatever happened.  A copy of the
directories (a restored snapshot) starts as a new instance with `start(existing=True)`, which runs
the engine's crash recovery and reports how long it took (`Startup`).  PostgreSQL can also archive
its WAL (`archive_dir`) and start a restored copy by archive recovery from a backup_label
(`start_archive_recovery`): the restore of a snapshot whose pieces are not one atomic image."""
from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import os
import pwd
import re
import secrets
import select
import shlex
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from types import TracebackType

from pyexec.demo import safeio

START_TIMEOUT_S = 60.0  # a crash recovery of a sandbox-sized log takes well under a second
STOP_TIMEOUT_S = 30.0  # per escalation step: clean, then hard, then SIGKILL
KILL_WAIT_S = 10.0
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


def _which(name: str) -> str | None:
    # root's PATH lacks /usr/sbin under some sudo and container setups; mariadbd lives there.
    return shutil.which(name, path=os.environ.get("PATH", "") + ":/usr/sbin:/usr/bin")


def _run_dir() -> str:
    # The server log and socket must stay writable while the data filesystems are frozen, so they
    # live on tmpfs (/run), never next to the data.
    base = "/run" if os.access("/run", os.W_OK) else None
    return tempfile.mkdtemp(prefix="pyexec-db-", dir=base)


def _owner(user: str) -> tuple[int, int]:
    try:
        pw = pwd.getpwnam(user)
    except KeyError as err:
        raise ServerError(f"no OS user {user!r}: run scripts/setup.sh") from err
    return pw.pw_uid, pw.pw_gid


def _own_dir(path: str, uid: int, gid: int, mode: int) -> None:
    # Through its fd: a symlink the OS user left at path (its own directory, from an earlier run)
    # must not make root chown the directory it points at.
    safeio.own_dir(path, uid, gid, mode)


def _check_reachable(path: str, user: str, uid: int, gid: int) -> None:
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


def _read_from(path: str, offset: int) -> str:
    # The server log lies in the OS user's run directory: read by root, never through a symlink
    # (it would put the file it names into an error message).
    try:
        with safeio.directory(os.path.dirname(path)) as d:
            return safeio.read_at(d, os.path.basename(path))[offset:].decode(errors="replace")
    except OSError:
        return ""


def _size(path: str) -> int:
    try:
        return os.lstat(path).st_size
    except FileNotFoundError:
        return 0


class _Proc:
    """A process we started, watched through a pidfd so that a signal never reaches a reused pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def alive(self) -> bool:
        """True while the process has not exited."""
        return not select.select([self.fd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout s for the exit; True if it exited."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process (nothing if it is gone)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, sig)

    def close(self) -> None:
        """Release the pidfd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _children(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == ppid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def _kill_tree(proc: _Proc) -> None:
    """SIGKILL a server and its worker processes, and wait for them all to be gone."""
    kids = []
    for pid in _children(proc.pid):
        with contextlib.suppress(OSError):
            k = _Proc(pid)
            # The pidfd pins the pid: if it is still our server's child now, it is a worker.
            if pid in _children(proc.pid):
                kids.append(k)
            else:
                k.close()
    proc.kill()
    for k in kids:
        k.kill()
    for p in [proc, *kids]:
        p.wait(KILL_WAIT_S)
    for k in kids:
        k.close()


class _Server:
    """What both engines share: the run directory, the context manager, the teardown."""

    engine = ""

    def __init__(self, datadir: str, sockdir: str | None):
        self.datadir = os.path.abspath(datadir)
        self._given_sockdir = sockdir
        self.rundir: str | None = None
        self.sockdir: str | None = None
        self.proc: _Proc | None = None
        self.startup: Startup | None = None
        self.log = ""  # the server log of the last run, kept after stop()

    @property
    def running(self) -> bool:
        """True while the server process lives."""
        return self.proc is not None and self.proc.alive()

    def _make_rundir(self, uid: int, gid: int, user: str) -> None:
        for d in (self.datadir, *self._other_dirs(), self._given_sockdir):
            if d:
                _check_reachable(d, user, uid, gid)
        self.rundir = _run_dir()
        _own_dir(self.rundir, uid, gid, 0o750)
        self.sockdir = self._given_sockdir or self.rundir
        if self._given_sockdir:
            _own_dir(self._given_sockdir, uid, gid, 0o755)

    def _logfile(self) -> str:
        assert self.rundir is not None
        return os.path.join(self.rundir, f"{self.engine}.log")

    def _cleanup(self) -> None:
        if self.rundir is not None:
            log = _read_from(self._logfile(), 0)
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
                _kill_tree(self.proc)
            self._cleanup()

    def _stop(self) -> None:
        raise NotImplementedError

    def _fail(self, what: str, detail: str = "") -> ServerError:
        tail = _read_from(self._logfile(), 0)[-2000:] if self.rundir else ""
        return ServerError(f"{self.engine}: {what}" + (f": {detail}" if detail else "")
                           + (f"\n--- server log ---\n{tail}" if tail else ""))

    def __enter__(self) -> "_Server":
        if not self.running:
            self.start()
        return self

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()

    def start(self, existing: bool | None = None) -> Startup:
        """Start the server; see the engine's class."""
        raise NotImplementedError


# ---------------------------------------------------------------------------------------- PostgreSQL

PG_VERSION = "15"
PG_TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "pgbench", "pg_amcheck", "pg_controldata")
# The sandbox's configuration: durable (fsync, full pages) and small.
PG_CONF = """
# pyexec sandbox (pyexec/demo/servers.py)
fsync = on
synchronous_commit = on
full_page_writes = on
shared_buffers = 16MB
max_connections = 20
wal_level = replica
max_wal_size = 64MB
min_wal_size = 32MB
log_checkpoints = on
logging_collector = off
"""
_PG_REDO_START = re.compile(r"redo starts at ([0-9A-F]+/[0-9A-F]+)")
_PG_REDO_DONE = re.compile(r"redo done at ([0-9A-F]+/[0-9A-F]+).*?elapsed: ([0-9.]+) s")
_PG_BACKUP_END = re.compile(r"completed backup recovery with redo LSN [0-9A-F]+/[0-9A-F]+ and end LSN ([0-9A-F]+/[0-9A-F]+)")
_PG_CONSISTENT = re.compile(r"consistent recovery state reached at ([0-9A-F]+/[0-9A-F]+)")
_PG_STOPPING = re.compile(r"LOG:\s+(recovery stopping [^\n]*)")
_PG_TIMELINE = re.compile(r"selected new timeline ID: (\d+)")
_PG_RESTORED = re.compile(r'restored log file "[0-9A-F]+(?:\.history)?" from archive')


def _archive_command(archive: str) -> str:
    """Copy a completed segment into archive (as PostgreSQL's docs: never overwrite), durably: a
    temporary name, fsync, rename, fsync of the directory; a failure is retried by the archiver."""
    d = shlex.quote(archive)
    return (f"test ! -f {d}/%f && cp %p {d}/%f.tmp && sync {d}/%f.tmp && mv {d}/%f.tmp {d}/%f && sync {d}")


@dataclasses.dataclass
class _ArchiveRecovery:
    label: str  # backup_label's text
    spcmap: str | None  # tablespace_map's, if the backup had one
    archive_dir: str
    target: str | None  # recovery_target: "immediate", or None (replay the whole archive)
    keep_wal: bool


def _lsn_text(text: str) -> str:
    """text if it is an LSN "X/Y" (it goes into SQL), else ValueError."""
    if not re.fullmatch(r"[0-9A-Fa-f]{1,8}/[0-9A-Fa-f]{1,8}", text):
        raise ValueError(f"not an LSN: {text!r}")
    return text


def _lsn(text: str) -> int:
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@functools.cache
def _pg_binaries() -> dict[str, str]:
    dirs = [f"/usr/lib/postgresql/{PG_VERSION}/bin"]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in dirs:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in PG_TOOLS):
            return {t: os.path.join(d, t) for t in PG_TOOLS}
    found = {t: _which(t) for t in PG_TOOLS}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise ServerError(f"PostgreSQL tools not found ({', '.join(missing)}): run scripts/setup.sh")
    return {t: p for t, p in found.items() if p is not None}


class PostgresServer(_Server):
    """A private PostgreSQL cluster: data in datadir, WAL in waldir (another filesystem) if given,
    a Unix socket only (listen_addresses=''), run as the OS user postgres; its completed WAL
    segments copied to archive_dir if given.

    The per-instance settings (socket, port, archive, recovery) go on the command line, never into
    postgresql.conf: a restored copy must not inherit its original's archive_command (it would
    write its own new timeline into the original's archive)."""

    engine = "postgresql"

    def __init__(self, datadir: str, *, waldir: str | None = None, sockdir: str | None = None,
                 port: int = 5432, password: str | None = None, os_user: str = "postgres",
                 archive_dir: str | None = None, settings: dict[str, str] | None = None):
        """archive_dir: archive every completed WAL segment there (archive_mode); it must not be on
        a filesystem the tests freeze, and the OS user gets it (mode 700).  settings: more
        server settings for this instance's command line (a TCP listener with TLS, say), last."""
        super().__init__(datadir, sockdir)
        self.waldir = os.path.abspath(waldir) if waldir else None
        self.archive_dir = os.path.abspath(archive_dir) if archive_dir else None
        self.port = port
        # A restored copy keeps the original's password: pass the original's to reach it.
        self.password = password or secrets.token_hex(12)
        self.os_user = os_user
        self.settings = dict(settings or {})
        self.bin = self.find_binaries()
        self.postmaster_pid: int | None = None

    @staticmethod
    def find_binaries() -> dict[str, str]:
        """Paths of the PostgreSQL tools (initdb, pg_ctl, postgres, psql, pgbench, …), or ServerError."""
        return dict(_pg_binaries())

    def _as_user(self, argv: list[str], timeout: float, check: bool = True,
                 input: str | None = None) -> subprocess.CompletedProcess[str]:
        # initdb, pg_ctl and postgres refuse to run as root; the umask keeps new files private.
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": self.password}
        try:
            res = subprocess.run(argv, user=self.os_user, group=_owner(self.os_user)[1], extra_groups=[],
                                 umask=0o077, cwd="/", env=env, input=input, capture_output=True,
                                 text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise self._fail(f"{os.path.basename(argv[0])} timed out after {timeout:.0f}s") from err
        if check and res.returncode != 0:
            raise self._fail(f"{' '.join(argv[:2])} failed ({res.returncode})",
                             (res.stderr or res.stdout).strip())
        return res

    def _initdb(self, uid: int, gid: int) -> None:
        _own_dir(self.datadir, uid, gid, 0o700)
        argv = [self.bin["initdb"], "-D", self.datadir, "-U", "postgres", "--locale=C", "-E", "UTF8",
                "--auth-local=scram-sha-256", "--auth-host=reject", "--no-instructions"]
        if self.waldir:
            _own_dir(self.waldir, uid, gid, 0o700)
            argv += ["--waldir", self.waldir]
        assert self.rundir is not None
        pwfile = os.path.join(self.rundir, "pw")
        # O_EXCL: created, never opened through what the OS user (the run directory's owner) left
        # there; chowned through the fd, not the name it could swap meanwhile.
        with open(os.open(pwfile, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600), "w") as f:
            f.write(self.password + "\n")
            os.fchown(f.fileno(), uid, gid)
        try:
            self._as_user(argv + ["--pwfile", pwfile], timeout=120)
        finally:
            os.unlink(pwfile)
        self._add_conf(uid, gid)

    def _add_conf(self, uid: int, gid: int) -> None:
        """The sandbox's settings after initdb's postgresql.conf.  initdb ran as the OS user, which owns
        the data directory: the file is read and replaced through the directory's fd, never appended
        to through a symlink or a hard link that user left there."""
        with safeio.directory(self.datadir) as d:
            conf = safeio.read_at(d, "postgresql.conf")
            safeio.write_at(d, "postgresql.conf", conf + PG_CONF.encode(), 0o600, uid, gid)

    def _prepare_existing(self, uid: int, gid: int) -> None:
        if not os.path.exists(os.path.join(self.datadir, "PG_VERSION")):
            raise ServerError(f"postgresql: {self.datadir} holds no cluster (no PG_VERSION)")
        wal = os.path.join(self.datadir, "pg_wal")
        if self.waldir and os.path.islink(wal) and os.readlink(wal) != self.waldir:
            # A restored copy's pg_wal still points at the original's WAL directory.
            os.unlink(wal)
            os.symlink(self.waldir, wal)
        pidfile = os.path.join(self.datadir, "postmaster.pid")
        try:
            with safeio.directory(self.datadir) as dfd:
                pid = int(safeio.read_at(dfd, "postmaster.pid").split(b"\n", 1)[0])
        except (FileNotFoundError, ValueError):
            pid = 0
        if pid:
            try:
                here = os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(self.datadir)
            except OSError:
                here = False
            if here:
                raise ServerError(f"postgresql: a postmaster (pid {pid}) runs in {self.datadir}")
            # A snapshot of a running cluster carries its postmaster's pid; that process is alive
            # (it serves the original) and postgres would refuse the copy as "already running".
            os.unlink(pidfile)
        for d in filter(None, (self.datadir, self.waldir)):
            safeio.chown_tree(d, uid, gid)
            _own_dir(d, uid, gid, 0o700)

    def start(self, existing: bool | None = None) -> Startup:
        """Start the server: initdb first unless the data directory holds a cluster (existing=None
        decides by PG_VERSION); an existing one is recovered.  Returns (and keeps) the Startup."""
        return self._start(existing, None)

    def start_archive_recovery(self, backup_label: str, archive_dir: str, *, target: str | None = "immediate",
                               tablespace_map: str | None = None, keep_wal: bool = False) -> Startup:
        """Start a restored copy (datadir, and waldir if given: the snapshot's pieces) by archive
        recovery from a backup_label: the restore of a snapshot whose pieces are not one atomic image.

        As PostgreSQL's "Recovering Using a Continuous Archive Backup": the copied pg_wal is emptied
        (its segments are from whatever instant its piece was taken; keep_wal=True leaves them, to be
        used where the archive lacks a segment), backup_label (and tablespace_map: the given one, else
        one beside the label) is put into the data directory, recovery.signal created, and the server
        started with restore_command copying from archive_dir and recovery_target_action=promote.

        target: "immediate" (the default) stops at the backup's consistency point, the end of the
        backup (its stop LSN): the earliest state the pieces can be restored to, and the one closest
        to the snapshot; None replays every segment the archive holds (the latest state, which is
        not the snapshot's and depends on when the restore runs).

        Returns once recovery has ended and the copy is promoted (read-write), with consistent_at,
        stopped, timeline and restored_files parsed from the log; ServerError if it does not get
        there (e.g. "WAL ends before consistent recovery point": a segment up to the stop LSN is
        missing from the archive)."""
        label = open(backup_label).read()
        if "START WAL LOCATION:" not in label:
            raise ServerError(f"postgresql: {backup_label} is not a backup_label")
        if tablespace_map is None:
            beside = os.path.join(os.path.dirname(backup_label), "tablespace_map")
            tablespace_map = beside if os.path.exists(beside) else None
        spcmap = open(tablespace_map).read() if tablespace_map else None
        if not os.path.isdir(archive_dir):
            raise ServerError(f"postgresql: no WAL archive at {archive_dir}")
        if target not in (None, "immediate"):
            raise ValueError(f"target: 'immediate' or None, not {target!r}")
        return self._start(True, _ArchiveRecovery(label, spcmap, os.path.abspath(archive_dir), target, keep_wal))

    def _start(self, existing: bool | None, recovery: _ArchiveRecovery | None) -> Startup:
        if self.running:
            raise ServerError("postgresql: already running")
        t0 = time.monotonic()
        uid, gid = _owner(self.os_user)
        if existing is None:
            existing = os.path.exists(os.path.join(self.datadir, "PG_VERSION"))
        try:
            self._make_rundir(uid, gid, self.os_user)
            if existing:
                self._prepare_existing(uid, gid)
            else:
                self._initdb(uid, gid)
            log = self._logfile()
            offset = _size(log)
            assert self.sockdir is not None
            # The per-instance settings go on the command line: a restored copy's postgresql.conf
            # names the original's socket directory.
            opts = ["-c", "listen_addresses=", "-k", self.sockdir, "-p", str(self.port)]
            if self.archive_dir:
                _own_dir(self.archive_dir, uid, gid, 0o700)
                opts += ["-c", "archive_mode=on", "-c", f"archive_command={_archive_command(self.archive_dir)}"]
            if recovery is not None:
                opts += self._prepare_recovery(recovery, uid, gid)
            for key, value in self.settings.items():
                opts += ["-c", f"{key}={value}"]
            res = self._as_user([self.bin["pg_ctl"], "start", "-D", self.datadir, "-l", log, "-w",
                                 "-t", str(int(START_TIMEOUT_S)), "-o", shlex.join(opts)],
                                timeout=START_TIMEOUT_S + 10, check=False)
            self._adopt_postmaster()
            if res.returncode != 0:
                raise self._fail("pg_ctl start failed", (res.stderr or res.stdout).strip())
            if self.proc is None:
                raise self._fail("no postmaster.pid after a successful pg_ctl start")
            if recovery is not None:
                self._wait_promoted(t0 + START_TIMEOUT_S)
        except BaseException:
            if self.proc is None and self.rundir is not None:
                # Interrupted inside pg_ctl: a postmaster may be up without us knowing it yet.
                self._adopt_postmaster()
            self.stop()
            raise
        self.startup = self._parse_startup(_read_from(log, offset), time.monotonic() - t0)
        return self.startup

    def _prepare_recovery(self, rec: _ArchiveRecovery, uid: int, gid: int) -> list[str]:
        """Files and settings of an archive recovery (the data directory is the OS user's already)."""
        if not rec.keep_wal:
            # The restore's own WAL comes from the archive; a stale segment left in pg_wal would be
            # read where the archive lacks one.  archive_status goes too (it names those segments).
            # pg_wal is a directory, or the symlink to waldir that initdb --waldir made: no other.
            wal = os.path.join(self.datadir, "pg_wal")
            if self.waldir and os.path.islink(wal) and os.readlink(wal) == self.waldir:
                wal = self.waldir
            with safeio.directory(wal) as w:
                safeio.empty_dir(w)
                safeio.own_dir("archive_status", uid, gid, 0o700, dir_fd=w)
        with safeio.directory(self.datadir) as d:
            for name, text in (("backup_label", rec.label), ("tablespace_map", rec.spcmap),
                               ("recovery.signal", "")):
                if text is not None:
                    safeio.write_at(d, name, text.encode(), 0o600, uid, gid)
        _check_reachable(os.path.join(rec.archive_dir, "x"), self.os_user, uid, gid)
        cp = f"cp {shlex.quote(rec.archive_dir)}/%f %p"
        opts = ["-c", f"restore_command={cp}", "-c", "recovery_target_action=promote"]
        if rec.target:
            opts += ["-c", f"recovery_target={rec.target}"]
        return opts

    def _wait_promoted(self, deadline: float) -> None:
        """pg_ctl -w returns once the copy accepts (read-only) connections, which an archive recovery
        does at consistency: wait for the end of recovery and the promotion."""
        assert self.proc is not None
        while True:
            try:
                # The startup process ends recovery (pg_is_in_recovery() turns false) an instant before
                # the postmaster logs that it accepts connections, which Startup.promoted reads.
                if self.psql("SELECT pg_is_in_recovery()", timeout=10) == "f" and \
                        "database system is ready to accept connections" in \
                        _read_from(self._logfile(), 0).rpartition("archive recovery complete")[2]:
                    return
            except ServerError:
                pass  # not accepting connections at this instant (the end of recovery)
            if not self.proc.alive():
                raise self._fail("the postmaster exited during archive recovery")
            if time.monotonic() > deadline:
                raise self._fail(f"archive recovery not ended within {START_TIMEOUT_S:.0f}s")
            self.proc.wait(0.05)

    def _adopt_postmaster(self) -> None:
        try:
            with safeio.directory(self.datadir) as d:
                pid = int(safeio.read_at(d, "postmaster.pid").split(b"\n", 1)[0])
            proc = _Proc(pid)
        except (OSError, ValueError):
            return
        # A postmaster works in its data directory; any other process with that pid is not ours
        # to stop (a failed start can leave a stale pid file whose pid has been reused).
        try:
            ours = os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(self.datadir)
        except OSError:
            ours = False
        if ours:
            self.postmaster_pid, self.proc = pid, proc
        else:
            proc.close()

    @staticmethod
    def _parse_startup(log: str, seconds: float) -> Startup:
        s = Startup(seconds=seconds, recovered=False)
        s.log = [ln for ln in log.splitlines() if re.search(
            r"recovery|redo |not properly shut down|interrupted|invalid record|ready to accept", ln)]
        if m := _PG_REDO_START.search(log):
            s.recovered = True
            s.redo_start = m.group(1)
        if m := _PG_REDO_DONE.search(log):
            s.redo_end, s.redo_seconds = m.group(1), float(m.group(2))
            if s.redo_start:
                s.redo_bytes = _lsn(s.redo_end) - _lsn(s.redo_start)
        if "automatic recovery in progress" in log:
            s.recovered = True
        if "starting archive recovery" in log or "starting point-in-time recovery" in log:
            s.recovered = s.archive_recovery = True
            s.log = [ln for ln in log.splitlines() if re.search(
                r"recovery|redo |from archive|new timeline|ready to accept", ln)]
            if m := _PG_BACKUP_END.search(log):
                s.backup_end = m.group(1)
            if m := _PG_CONSISTENT.search(log):
                s.consistent_at = m.group(1)
            if m := _PG_STOPPING.search(log):
                s.stopped = m.group(1).strip()
            if m := _PG_TIMELINE.search(log):
                s.timeline = int(m.group(1))
            s.restored_files = len(_PG_RESTORED.findall(log))
            s.promoted = "archive recovery complete" in log and \
                "database system is ready to accept connections" in log
        return s

    def _socket_names(self) -> list[str]:
        return [f".s.PGSQL.{self.port}", f".s.PGSQL.{self.port}.lock"]

    def _other_dirs(self) -> list[str]:
        return [d for d in (self.waldir, self.archive_dir) if d]

    def _stop(self) -> None:
        assert self.proc is not None
        for mode in ("fast", "immediate"):
            self._as_user([self.bin["pg_ctl"], "stop", "-D", self.datadir, "-m", mode, "-w",
                           "-t", str(int(STOP_TIMEOUT_S))], timeout=STOP_TIMEOUT_S + 10, check=False)
            # pg_ctl returns once postmaster.pid is gone, an instant before the process exits.
            if self.proc.wait(STOP_TIMEOUT_S):
                return
        _kill_tree(self.proc)

    def kill(self) -> None:
        """SIGKILL the postmaster and its workers (a crash, for recovery tests), then clean up."""
        if self.proc is not None:
            _kill_tree(self.proc)
        self.stop()

    def connect_args(self, dbname: str = "postgres", user: str = "postgres",
                     password: str | None = None) -> dict[str, str | int]:
        """Keyword arguments of psycopg.connect() for this instance."""
        if self.sockdir is None:
            raise ServerError("postgresql: not running")
        return {"host": self.sockdir, "port": self.port, "user": user, "dbname": dbname,
                "password": password if password is not None else self.password}

    def wait_archived(self, lsn: str, timeout: float = 30.0) -> str:
        """Wait (at most timeout s) until the WAL segment holding lsn is archived; its name.  With this
        instance's archive_dir, the segment's file there is the proof (the archive_command renames it
        into place once synced); otherwise pg_stat_archiver's last archived segment, a plain segment
        name at or after it (not a backup history file "<segment>.<offset>.backup", which is archived
        after its start segment, not necessarily after the stop's).  ServerError when it is not, with
        pg_stat_archiver's last archived and last failed file."""
        seg = self.psql(f"SELECT pg_walfile_name('{_lsn_text(lsn)}')")
        deadline = time.monotonic() + timeout
        while True:
            last, failed = self.psql("SELECT coalesce(last_archived_wal, ''), "
                                     "coalesce(last_failed_wal, '') FROM pg_stat_archiver").split("|")
            if self.archive_dir:
                if os.path.exists(os.path.join(self.archive_dir, seg)):
                    return seg
            elif re.fullmatch(r"[0-9A-F]{24}", last) and last >= seg:  # one timeline: names sort as LSNs
                return seg
            if time.monotonic() > deadline:
                raise ServerError(f"postgresql: {seg} (holding {lsn}) not archived within {timeout:.0f}s; "
                                  f"last archived {last or 'none'}, last failed {failed or 'none'}")
            time.sleep(0.05)

    def psql(self, sql: str, dbname: str = "postgres", timeout: float = 60) -> str:
        """Run sql with psql as the superuser (unaligned, tuples only); its output, or ServerError."""
        if self.sockdir is None:
            raise ServerError("postgresql: not running")
        res = self._as_user([self.bin["psql"], "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
                             "-h", self.sockdir, "-p", str(self.port), "-U", "postgres", "-d", dbname,
                             "-f", "-"], input=sql, timeout=timeout, check=False)
        if res.returncode != 0:
            raise ServerError(f"psql failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.rstrip("\n")

    def __enter__(self) -> "PostgresServer":
        super().__enter__()
        return self


# ------------------------------------------------------------------------------------------- MariaDB

MARIADB_TOOLS = ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin")
_INNODB_CHECKPOINT = re.compile(r"InnoDB: Starting crash recovery from checkpoint LSN=(\d+)")
_INNODB_END = re.compile(r"InnoDB: (?:End of log at|.*?log sequence number) LSN=(\d+)")


def _sql_str(text: str) -> str:
    """text as a MariaDB string literal (backslashes escape in the default sql_mode)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


@functools.cache
def _mariadb_binaries() -> dict[str, str]:
    found = {t: _which(t) for t in MARIADB_TOOLS}
    missing = [t for t, p in found.items() if p is None]
    if missing:
        raise ServerError(f"MariaDB tools not found ({', '.join(missing)}): run scripts/setup.sh")
    return {t: p for t, p in found.items() if p is not None}


@functools.cache
def _speaks_sd_notify(binary: str) -> bool:
    # Debian's mariadbd links libsystemd and sends READY=1 to $NOTIFY_SOCKET once it accepts
    # connections (sd_notify(3)); a build without it is waited for by pinging.
    with open(binary, "rb") as f:
        return b"libsystemd.so" in f.read()


class MariaDBServer(_Server):
    """A private MariaDB server: data in datadir, binlog and InnoDB redo log in logdir (another
    filesystem) if given, a Unix socket only (skip-networking), run as the OS user mysql."""

    engine = "mariadb"

    def __init__(self, datadir: str, *, logdir: str | None = None, sockdir: str | None = None,
                 password: str | None = None, server_id: int = 1, os_user: str = "mysql",
                 options: list[str] | None = None):
        """options: more [mariadbd] lines for this instance (a TCP listener with TLS, say), last."""
        super().__init__(datadir, sockdir)
        self.options = list(options or [])
        self.logdir = os.path.abspath(logdir) if logdir else None
        # root@localhost's password; a restored copy keeps the original's.
        self.password = password or secrets.token_hex(12)
        self.server_id = server_id
        self.os_user = os_user
        self.bin = self.find_binaries()
        self._popen: subprocess.Popen[bytes] | None = None

    @staticmethod
    def find_binaries() -> dict[str, str]:
        """Paths of mariadbd, mariadb-install-db, mariadb and mariadb-admin, or ServerError."""
        return dict(_mariadb_binaries())

    @property
    def socket_path(self) -> str:
        """The server's Unix socket."""
        if self.sockdir is None:
            raise ServerError("mariadb: not running")
        return os.path.join(self.sockdir, "mariadbd.sock")

    def _socket_names(self) -> list[str]:
        return ["mariadbd.sock", "mariadbd.sock.lock"]

    def _other_dirs(self) -> list[str]:
        return [self.logdir] if self.logdir else []

    def _cnf(self) -> str:
        assert self.rundir is not None
        return os.path.join(self.rundir, "my.cnf")

    def _write_cnf(self) -> None:
        assert self.rundir is not None
        logdir = self.logdir or self.datadir
        lines = [
            "[mariadbd]",
            f"datadir = {self.datadir}",
            f"socket = {self.socket_path}",
            f"pid-file = {os.path.join(self.rundir, 'mariadbd.pid')}",
            f"log-error = {self._logfile()}",
            f"user = {self.os_user}",
            "skip-networking",
            f"log-bin = {os.path.join(logdir, 'binlog')}",
            f"log-bin-index = {os.path.join(logdir, 'binlog.index')}",
            f"innodb_log_group_home_dir = {logdir}",
            "innodb_flush_log_at_trx_commit = 1",
            "sync_binlog = 1",
            "binlog_format = ROW",
            f"server_id = {self.server_id}",
            "gtid_domain_id = 0",
            "gtid_strict_mode = ON",
            "innodb_buffer_pool_size = 32M",
            "innodb_log_file_size = 16M",
            "performance_schema = OFF",
            *self.options,
            "",
            # The clients as root over the socket: root@localhost is "native password OR
            # unix_socket", and the password below lets a client run as any OS user in.
            "[client]",
            f"socket = {self.socket_path}",
            "user = root",
            f"password = {self.password}",
            "",
        ]
        # root's, 600 (it holds root@localhost's password), in the OS user's run directory.
        with safeio.directory(self.rundir) as d:
            safeio.write_at(d, os.path.basename(self._cnf()), "\n".join(lines).encode(), 0o600)

    def _fix_binlog_index(self) -> None:
        # The index lists each binlog by the absolute path it had when written; a restored copy's
        # lists the original's files, so it is pointed at the copy's log directory.
        logdir = self.logdir or self.datadir
        with safeio.directory(logdir) as d:
            try:
                text = safeio.read_at(d, "binlog.index").decode()
            except FileNotFoundError:
                return
            st = os.fstat(d)
            names = [os.path.basename(ln.strip()) for ln in text.splitlines() if ln.strip()]
            safeio.write_at(d, "binlog.index", "".join(os.path.join(logdir, n) + "\n" for n in names).encode(),
                            0o640, st.st_uid, st.st_gid)

    def start(self, existing: bool | None = None) -> Startup:
        """Start the server: mariadb-install-db first unless the data directory holds one
        (existing=None decides by its mysql/ schema); an existing one is crash-recovered by InnoDB
        and the binlog.  Returns (and keeps) the Startup."""
        if self.running:
            raise ServerError("mariadb: already running")
        t0 = time.monotonic()
        uid, gid = _owner(self.os_user)
        if existing is None:
            existing = os.path.isdir(os.path.join(self.datadir, "mysql"))
        fresh = not existing
        notify: socket.socket | None = None
        try:
            self._make_rundir(uid, gid, self.os_user)
            for d in filter(None, (self.datadir, self.logdir)):
                _own_dir(d, uid, gid, 0o750)
            self._write_cnf()
            if existing:
                if not os.path.isdir(os.path.join(self.datadir, "mysql")):
                    raise ServerError(f"mariadb: {self.datadir} holds no server (no mysql/)")
                self._fix_binlog_index()
                for d in filter(None, (self.datadir, self.logdir)):
                    safeio.chown_tree(d, uid, gid)
            else:
                self._install_db()
            log = self._logfile()
            offset = _size(log)
            env = {"PATH": "/usr/bin:/bin:/usr/sbin", "LC_ALL": "C"}
            if _speaks_sd_notify(self.bin["mariadbd"]):
                notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
                name = f"\0pyexec-mariadb-{secrets.token_hex(8)}"  # abstract: no file to chmod
                notify.bind(name)
                env["NOTIFY_SOCKET"] = "@" + name[1:]
            self._popen = subprocess.Popen(
                [self.bin["mariadbd"], f"--defaults-file={self._cnf()}"], env=env, cwd="/",
                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                start_new_session=True)  # a Ctrl-C meant for the caller is the caller's to handle
            self.proc = _Proc(self._popen.pid)
            self._wait_ready(notify, time.monotonic() + START_TIMEOUT_S)
            if fresh:
                self._secure_root()
        except BaseException:
            if self.proc is None and self._popen is not None:
                self._popen.kill()  # interrupted before its pidfd was opened
            self.stop()
            raise
        finally:
            if notify is not None:
                notify.close()
        self.startup = self._parse_startup(_read_from(log, offset), time.monotonic() - t0)
        return self.startup

    def _install_db(self) -> None:
        # socket authentication (the default since 10.4): root@localhost is created as "invalid
        # native password OR unix_socket", so no window with an empty root password exists.  The
        # socket user defaults to --user (mysql), which would add a second superuser mysql@localhost;
        # naming root keeps root the only one.
        res = subprocess.run(
            [self.bin["mariadb-install-db"], f"--defaults-file={self._cnf()}", f"--user={self.os_user}",
             "--auth-root-authentication-method=socket", "--auth-root-socket-user=root",
             "--skip-test-db", "--skip-name-resolve"],
            cwd="/", capture_output=True, text=True, timeout=180, check=False)
        if res.returncode != 0:
            raise self._fail("mariadb-install-db failed", (res.stderr or res.stdout).strip()[-2000:])

    def _secure_root(self) -> None:
        # The client runs as OS root, so unix_socket admits it; from now on the password does too.
        self.sql("ALTER USER root@localhost IDENTIFIED VIA mysql_native_password USING "
                 f"PASSWORD({_sql_str(self.password)}) OR unix_socket")

    def _wait_ready(self, notify: socket.socket | None, deadline: float) -> None:
        assert self.proc is not None
        poll = select.poll()
        poll.register(self.proc.fd, select.POLLIN)
        if notify is None:
            while not self._ping():
                if not self.proc.alive():
                    raise self._fail("mariadbd exited during startup")
                if time.monotonic() > deadline:
                    raise self._fail(f"not ready within {START_TIMEOUT_S:.0f}s")
                poll.poll(50)  # only without sd_notify: nothing else tells us it is ready
            return
        poll.register(notify.fileno(), select.POLLIN)
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise self._fail(f"not ready within {START_TIMEOUT_S:.0f}s")
            ready = dict(poll.poll(int(left * 1000) + 1))
            if notify.fileno() in ready:
                msg = notify.recv(4096).decode(errors="replace")
                if "READY=1" in msg.split("\n"):
                    return
            if self.proc.fd in ready:
                raise self._fail("mariadbd exited during startup")

    def _ping(self) -> bool:
        res = subprocess.run([self.bin["mariadb-admin"], f"--defaults-file={self._cnf()}",
                              "--connect-timeout=2", "ping"], capture_output=True, timeout=10, check=False)
        return res.returncode == 0

    @staticmethod
    def _parse_startup(log: str, seconds: float) -> Startup:
        s = Startup(seconds=seconds, recovered=False)
        s.log = [ln for ln in log.splitlines() if re.search(
            r"[Rr]ecover|crash|LSN=|redo|binlog|ready for connections", ln)]
        if m := _INNODB_CHECKPOINT.search(log):
            s.recovered = True
            s.redo_start = m.group(1)
            if e := _INNODB_END.search(log, m.end()):
                s.redo_end = e.group(1)
                s.redo_bytes = int(s.redo_end) - int(s.redo_start)
        if "Recovering after a crash" in log:
            s.recovered = True
        return s

    def _stop(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([self.bin["mariadb-admin"], f"--defaults-file={self._cnf()}",
                            "--connect-timeout=5", "shutdown"],
                           capture_output=True, timeout=STOP_TIMEOUT_S, check=False)
        if not self.proc.wait(STOP_TIMEOUT_S):
            self.proc.kill(signal.SIGTERM)
            if not self.proc.wait(STOP_TIMEOUT_S):
                _kill_tree(self.proc)

    def _cleanup(self) -> None:
        if self._popen is not None:
            # Our child: reaped here, after the pidfd said it exited (or after the SIGKILL).
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=KILL_WAIT_S)
            self._popen = None
        super()._cleanup()

    def kill(self) -> None:
        """SIGKILL mariadbd (a crash, for recovery tests), then clean up."""
        if self.proc is not None:
            _kill_tree(self.proc)
        self.stop()

    def connect_args(self, user: str = "root", password: str | None = None,
                     database: str | None = None) -> dict[str, str]:
        """Keyword arguments of pymysql.connect() for this instance (root with its password by default)."""
        args = {"unix_socket": self.socket_path, "user": user,
                "password": password if password is not None else self.password}
        if database:
            args["database"] = database
        return args

    def sql(self, statement: str, database: str | None = None, timeout: float = 60) -> str:
        """Run statement(s) with the mariadb client as root (batch, no column names); its output."""
        if self.rundir is None:
            raise ServerError("mariadb: not running")
        argv = [self.bin["mariadb"], f"--defaults-file={self._cnf()}", "--batch", "--skip-column-names"]
        if database:
            argv.append(f"--database={database}")
        res = subprocess.run(argv, input=statement, capture_output=True, text=True, timeout=timeout,
                             check=False)
        if res.returncode != 0:
            raise ServerError(f"mariadb failed ({res.returncode}): {res.stderr.strip()}")
        return res.stdout.rstrip("\n")

    def create_user(self, user: str, password: str, privileges: str = "ALL PRIVILEGES") -> None:
        """Create user@localhost with password, granted privileges ON *.*."""
        who = f"{_sql_str(user)}@'localhost'"
        self.sql(f"CREATE USER {who} IDENTIFIED BY {_sql_str(password)};\n"
                 f"GRANT {privileges} ON *.* TO {who};")

    def __enter__(self) -> "MariaDBServer":
        super().__enter__()
        return self
