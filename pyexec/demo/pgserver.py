"""A private PostgreSQL server in the sandbox: initdb, start (crash recovery of a restored copy, or
archive recovery from a backup_label), stop; reached over a Unix socket only."""
from __future__ import annotations

import dataclasses
import functools
import glob
import os
import re
import secrets
import shlex
import subprocess
import time

from pyexec.demo import safeio
from pyexec.demo.dbserver import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Server,
    ServerError,
    Startup,
    check_reachable,
    file_size,
    find_tools,
    owner,
    read_from,
    recovery_lines,
)
from pyexec.demo.processes import Proc, kill_tree, works_in

PG_VERSION = "15"
PG_TOOLS = ("initdb", "pg_ctl", "postgres", "psql", "pgbench", "pg_amcheck", "pg_controldata")
# The sandbox's configuration: durable (fsync, full pages) and small.
PG_CONF = """
# pyexec sandbox (pyexec/demo/pgserver.py)
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


def lsn_value(text: str) -> int:
    """The LSN "X/Y" as a number (LSNs compare and subtract as numbers)."""
    hi, lo = text.split("/")
    return (int(hi, 16) << 32) | int(lo, 16)


@functools.cache
def _pg_binaries() -> dict[str, str]:
    dirs = [f"/usr/lib/postgresql/{PG_VERSION}/bin"]
    dirs += sorted(glob.glob("/usr/lib/postgresql/*/bin"), reverse=True)
    for d in dirs:
        if all(os.access(os.path.join(d, t), os.X_OK) for t in PG_TOOLS):
            return {t: os.path.join(d, t) for t in PG_TOOLS}
    return find_tools("PostgreSQL", PG_TOOLS)


class PostgresServer(Server):
    """A private PostgreSQL cluster: data in datadir, WAL in waldir (another filesystem) if given,
    a Unix socket only (listen_addresses=''), run as the OS user postgres; its completed WAL
    segments copied to archive_dir if given.

    The per-instance settings (socket, port, archive, recovery) go on the command line, never into
    postgresql.conf: a restored copy must not inherit its original's archive_command (it would
    write its own new timeline into the original's archive)."""

    engine = "postgresql"
    _RECOVERY_LINES = r"recovery|redo |not properly shut down|interrupted|invalid record|ready to accept"

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
            res = subprocess.run(argv, user=self.os_user, group=owner(self.os_user)[1], extra_groups=[],
                                 umask=0o077, cwd="/", env=env, input=input, capture_output=True,
                                 text=True, timeout=timeout, check=False)
        except subprocess.TimeoutExpired as err:
            raise self._fail(f"{os.path.basename(argv[0])} timed out after {timeout:.0f}s") from err
        if check and res.returncode != 0:
            raise self._fail(f"{' '.join(argv[:2])} failed ({res.returncode})",
                             (res.stderr or res.stdout).strip())
        return res

    def _initdb(self, uid: int, gid: int) -> None:
        safeio.own_dir(self.datadir, uid, gid, 0o700)
        argv = [self.bin["initdb"], "-D", self.datadir, "-U", "postgres", "--locale=C", "-E", "UTF8",
                "--auth-local=scram-sha-256", "--auth-host=reject", "--no-instructions"]
        if self.waldir:
            safeio.own_dir(self.waldir, uid, gid, 0o700)
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
        if pid := self._pid_file():
            if works_in(pid, self.datadir):
                raise ServerError(f"postgresql: a postmaster (pid {pid}) runs in {self.datadir}")
            # A snapshot of a running cluster carries its postmaster's pid; that process is alive
            # (it serves the original) and postgres would refuse the copy as "already running".
            os.unlink(os.path.join(self.datadir, "postmaster.pid"))
        for d in filter(None, (self.datadir, self.waldir)):
            safeio.chown_tree(d, uid, gid)
            safeio.own_dir(d, uid, gid, 0o700)

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
        uid, gid = owner(self.os_user)
        if existing is None:
            existing = os.path.exists(os.path.join(self.datadir, "PG_VERSION"))
        try:
            self._make_rundir(uid, gid, self.os_user)
            if existing:
                self._prepare_existing(uid, gid)
            else:
                self._initdb(uid, gid)
            log = self._logfile()
            offset = file_size(log)
            assert self.sockdir is not None
            # The per-instance settings go on the command line: a restored copy's postgresql.conf
            # names the original's socket directory.
            opts = ["-c", "listen_addresses=", "-k", self.sockdir, "-p", str(self.port)]
            if self.archive_dir:
                safeio.own_dir(self.archive_dir, uid, gid, 0o700)
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
        return self._started(log, offset, t0)

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
        check_reachable(os.path.join(rec.archive_dir, "x"), self.os_user, uid, gid)
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
                        read_from(self._logfile(), 0).rpartition("archive recovery complete")[2]:
                    return
            except ServerError:
                pass  # not accepting connections at this instant (the end of recovery)
            if not self.proc.alive():
                raise self._fail("the postmaster exited during archive recovery")
            if time.monotonic() > deadline:
                raise self._fail(f"archive recovery not ended within {START_TIMEOUT_S:.0f}s")
            self.proc.wait(0.05)

    def _pid_file(self) -> int:
        """The pid in the data directory's postmaster.pid; 0 if there is none."""
        try:
            with safeio.directory(self.datadir) as d:
                return int(safeio.read_at(d, "postmaster.pid").split(b"\n", 1)[0])
        except (FileNotFoundError, ValueError):
            return 0

    def _adopt_postmaster(self) -> None:
        try:
            pid = self._pid_file()
            if not pid:
                return
            proc = Proc(pid)
        except OSError:
            return
        # A postmaster works in its data directory; any other process with that pid is not ours
        # to stop (a failed start can leave a stale pid file whose pid has been reused).
        if works_in(pid, self.datadir):
            self.postmaster_pid, self.proc = pid, proc
        else:
            proc.close()

    def _read_recovery(self, log: str, s: Startup) -> None:
        if m := _PG_REDO_START.search(log):
            s.recovered = True
            s.redo_start = m.group(1)
        if m := _PG_REDO_DONE.search(log):
            s.redo_end, s.redo_seconds = m.group(1), float(m.group(2))
            if s.redo_start:
                s.redo_bytes = lsn_value(s.redo_end) - lsn_value(s.redo_start)
        if "automatic recovery in progress" in log:
            s.recovered = True
        if "starting archive recovery" in log or "starting point-in-time recovery" in log:
            s.recovered = s.archive_recovery = True
            s.log = recovery_lines(log, r"recovery|redo |from archive|new timeline|ready to accept")
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
        kill_tree(self.proc)

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

