"""A private MariaDB server in the sandbox: mariadb-install-db, start (InnoDB's and the binlog's
crash recovery of a restored copy), stop; reached over a Unix socket only (skip-networking)."""
from __future__ import annotations

import contextlib
import functools
import os
import re
import secrets
import select
import signal
import socket
import subprocess
import time

from pyexec import native, waits
from pyexec.demo import safeio
from pyexec.demo.dbserver import (
    START_TIMEOUT_S,
    STOP_TIMEOUT_S,
    Server,
    ServerError,
    Startup,
    file_size,
    find_tools,
    owner,
)
from pyexec.demo.processes import KILL_WAIT_S, Proc, kill_tree

MARIADB_TOOLS = ("mariadbd", "mariadb-install-db", "mariadb", "mariadb-admin")
_INNODB_CHECKPOINT = re.compile(r"InnoDB: Starting crash recovery from checkpoint LSN=(\d+)")
_INNODB_END = re.compile(r"InnoDB: (?:End of log at|.*?log sequence number) LSN=(\d+)")


def _sql_str(text: str) -> str:
    """text as a MariaDB string literal (backslashes escape in the default sql_mode)."""
    return "'" + text.replace("\\", "\\\\").replace("'", "''") + "'"


@functools.cache
def _mariadb_binaries() -> dict[str, str]:
    return find_tools("MariaDB", MARIADB_TOOLS)


@functools.cache
def _speaks_sd_notify(binary: str) -> bool:
    # Debian's mariadbd links libsystemd and sends READY=1 to $NOTIFY_SOCKET once it accepts
    # connections (sd_notify(3)); a build without it is waited for by pinging.
    with open(binary, "rb") as f:
        return b"libsystemd.so" in f.read()


class MariaDBServer(Server):
    """A private MariaDB server: data in datadir, binlog and InnoDB redo log in logdir (another
    filesystem) if given, a Unix socket only (skip-networking), run as the OS user mysql."""

    engine = "mariadb"
    _RECOVERY_LINES = r"[Rr]ecover|crash|LSN=|redo|binlog|ready for connections"

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
        uid, gid = owner(self.os_user)
        if existing is None:
            existing = os.path.isdir(os.path.join(self.datadir, "mysql"))
        fresh = not existing
        notify: socket.socket | None = None
        try:
            self._make_rundir(uid, gid, self.os_user)
            for d in filter(None, (self.datadir, self.logdir)):
                safeio.own_dir(d, uid, gid, 0o750)
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
            offset = file_size(log)
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
            self.proc = Proc(self._popen.pid)
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
        return self._started(log, offset, t0)

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
        if notify is None:
            poll = select.poll()
            poll.register(self.proc.fd, select.POLLIN)
            while not self._ping():
                if not self.proc.alive():
                    raise self._fail("mariadbd exited during startup")
                if time.monotonic() > deadline:
                    raise self._fail(f"not ready within {START_TIMEOUT_S:.0f}s")
                poll.poll(50)  # only without sd_notify: nothing else tells us it is ready
            return
        deadline_ns = native.ns_from_s(deadline)  # time.monotonic() is CLOCK_MONOTONIC, the core's clock
        while True:
            ready = waits.wait_readable([notify.fileno(), self.proc.fd], deadline_ns)
            if not ready:
                raise self._fail(f"not ready within {START_TIMEOUT_S:.0f}s")
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

    def _read_recovery(self, log: str, s: Startup) -> None:
        if m := _INNODB_CHECKPOINT.search(log):
            s.recovered = True
            s.redo_start = m.group(1)
            if e := _INNODB_END.search(log, m.end()):
                s.redo_end = e.group(1)
                s.redo_bytes = int(s.redo_end) - int(s.redo_start)
        if "Recovering after a crash" in log:
            s.recovered = True

    def _stop(self) -> None:
        assert self.proc is not None
        with contextlib.suppress(subprocess.TimeoutExpired):
            subprocess.run([self.bin["mariadb-admin"], f"--defaults-file={self._cnf()}",
                            "--connect-timeout=5", "shutdown"],
                           capture_output=True, timeout=STOP_TIMEOUT_S, check=False)
        if not self.proc.wait(STOP_TIMEOUT_S):
            self.proc.kill(signal.SIGTERM)
            if not self.proc.wait(STOP_TIMEOUT_S):
                kill_tree(self.proc)

    def _cleanup(self) -> None:
        if self._popen is not None:
            # Our child: reaped here, after the pidfd said it exited (or after the SIGKILL).
            with contextlib.suppress(subprocess.TimeoutExpired):
                self._popen.wait(timeout=KILL_WAIT_S)
            self._popen = None
        super()._cleanup()

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
