"""The PostgreSQL quiescer: CHECKPOINT before the window; a non-exclusive backup held by the session
when the window freezes more than one filesystem; the backup_label written after the thaw.

Why a checkpoint: a snapshot of one filesystem is atomic, and PostgreSQL recovers from it as from a
crash; the checkpoint just before it leaves little WAL to replay at restore.  Why the backup: frozen
one after the other, several filesystems (data, pg_wal, tablespaces) are not one atomic image, and
only a backup_label makes recovery start from a checkpoint older than every piece (PostgreSQL docs,
"Making a Base Backup Using the Low Level API").  Non-exclusive mode ends with the session that
started it, so the session is held from pre to post."""
from __future__ import annotations

import datetime
import os
import re
from types import ModuleType
from typing import Any

from pyexec import dbconfig, trust
from pyexec.errors import PyexecError, ScriptError
from pyexec.quiesce import endpoint
from pyexec.quiesce.session import ABORT_CONNECT_S, Failed, close_quietly, shutdown_fd

PG15 = 150000  # pg_backup_start/pg_backup_stop replace pg_start_backup/pg_stop_backup (PostgreSQL 15)
LIBPQ_REQUIRE_AUTH = 160000  # the require_auth connection parameter (libpq 16)


def check_driver(cfg: dbconfig.DatabaseConfig, driver: ModuleType) -> None:
    """ScriptError 300 if cfg needs what psycopg's libpq lacks (require_auth, for "tls": "disable")."""
    if cfg.socket or cfg.tls != "disable":
        return
    version = driver.pq.version()
    if version < LIBPQ_REQUIRE_AUTH:
        raise ScriptError(300, f"\"tls\": \"disable\" needs libpq 16 or later to refuse clear-text and MD5 password "
                               f"authentication (require_auth), and psycopg uses libpq {version}: install "
                               "psycopg[binary], or set tlsCAFile", cfg.path)


def check_label_dir(cfg: dbconfig.DatabaseConfig) -> None:
    """TrustError 307 if backupLabelDirectory, as far as it exists, is not root's alone: the check refuses
    it before the backup starts.  A missing or non-directory component is the release's to report."""
    if cfg.backup_mode == "never":
        return
    try:
        os.close(trust.open_dir(cfg.backup_label_dir, trust.LABEL_DIR))
    except PyexecError as e:
        if e.code != trust.LABEL_DIR.not_found:
            raise


class PostgresSession:
    """One psycopg connection, autocommit, every statement bounded by statement_timeout."""

    def __init__(self, cfg: dbconfig.DatabaseConfig, password: str, driver: ModuleType, ep: endpoint.Endpoint):
        self.cfg = cfg
        self._password = password
        self._pg = driver
        self._ep = ep
        self._fds: list[int] = []  # what the connection's parameters name as /proc/self/fd/N, held with it
        self.conn: Any = None
        self.in_backup = False
        self.label = ""

    def _params(self) -> dict[str, Any]:
        """Where libpq connects and how it authenticates the server first (docs/security-quiescers.md)."""
        if self.cfg.socket:
            # libpq checks the peer's credentials (SO_PEERCRED) against requirepeer right after the
            # connect, before its startup packet (libpq docs, "requirepeer"); the host is the checked
            # directory's fd, so the socket is looked up where the check looked.
            d = self._ep.open_socket_dir()
            self._fds.append(d)
            # The socket's own name walked too (a symlink there must be root's or serverUser's), for
            # the message; libpq looks it up again in d, where only they or its owner can change it.
            os.close(self._ep.open_socket())
            return {"host": f"/proc/self/fd/{d}", "requirepeer": self._ep.account}
        if self.cfg.tls == "verify-full":
            ca = self._ep.ca_memfd()
            self._fds.append(ca)
            return {"host": self.cfg.host, "sslmode": "verify-full", "sslrootcert": f"/proc/self/fd/{ca}"}
        # Unauthenticated TCP ("tls": "disable"): SCRAM only (libpq 16's require_auth): no clear-text
        # or MD5 password, and a server that skips authentication or cannot prove it knows the
        # password's verifier (SCRAM's server signature) is refused.
        return {"host": self.cfg.host, "sslmode": "prefer", "require_auth": "scram-sha-256"}

    def _connect(self, timeout_s: float) -> Any:
        # hostaddr empty, explicitly: libpq connects to a hostaddr (from PGHOSTADDR or a pg_service.conf
        # PGSERVICE names) over TCP and ignores host for the connection (libpq docs, "hostaddr"), so a
        # socket's checks (requirepeer applies to Unix sockets only) would be skipped and the password
        # sent to whoever listens there.  A parameter given, even empty, is not taken from either.
        return self._pg.connect(port=self.cfg.port, user=self.cfg.user, dbname=self.cfg.database, hostaddr="",
                                password=self._password or None, connect_timeout=max(2, int(timeout_s)),
                                autocommit=True, application_name="pyexec-quiesce", **self._params())

    def _one(self, sql: str, *args: object) -> Any:
        row = self.conn.execute(sql, args or None).fetchone()
        return row[0] if row else None

    def open(self, timeout_s: float) -> None:
        """Connect; the server itself ends a statement that outlives the plugin's timeout."""
        try:
            self.conn = self._connect(timeout_s)
        except endpoint.Refused as e:
            raise Failed(f"PostgreSQL at {self._ep.where}: {e}") from e
        except OSError as e:
            raise Failed(f"cannot connect to PostgreSQL at {self._ep.where} as {self.cfg.user}: "
                         f"{e.strerror or e}") from e
        except self._pg.OperationalError as e:
            msg = _unproc(str(e).strip(), self.cfg.host)
            if "requirepeer" in msg:
                raise Failed(f"refused: PostgreSQL at {self._ep.where}: the socket is not served by serverUser "
                             f"{self._ep.account} ({msg}): not the database server; the password was not sent") from e
            raise Failed(f"cannot connect to PostgreSQL at {self._ep.where} as {self.cfg.user}: {msg}") from e
        self.conn.execute(f"SET statement_timeout = {int(timeout_s * 1000)}")

    def quiesce(self, filesystems: int) -> dict[str, str]:
        """CHECKPOINT, then pg_backup_start if the snapshot is not one atomic image."""
        facts = {"server_version": str(self.conn.info.server_version)}
        try:
            self.conn.execute("CHECKPOINT")
        except self._pg.errors.InsufficientPrivilege as e:
            raise Failed(f"CHECKPOINT refused: {self.cfg.user} needs superuser or the pg_checkpoint role") from e
        facts["checkpoint_lsn"] = str(self._one("SELECT checkpoint_lsn FROM pg_control_checkpoint()"))
        mode = self.cfg.backup_mode
        if mode == "always" or (mode == "auto" and filesystems > 1):
            self.label = "pyexec " + datetime.datetime.now(datetime.UTC).strftime("%Y%m%dT%H%M%SZ")
            start = "pg_backup_start(%s, true)" if self.conn.info.server_version >= PG15 \
                else "pg_start_backup(%s, true, false)"
            facts["backup_start_lsn"] = str(self._one(f"SELECT {start}", self.label))
            self.in_backup = True
        in_recovery = self._one("SELECT pg_is_in_recovery()")
        facts["lsn"] = str(self._one("SELECT pg_last_wal_replay_lsn()" if in_recovery
                                     else "SELECT pg_current_wal_lsn()"))
        return facts

    def release(self, snapshot: str) -> dict[str, str]:
        """End the backup (writing its label unless the snapshot is known not taken) and the session."""
        if not self.in_backup:
            return {}
        stop = "pg_backup_stop(false)" if self.conn.info.server_version >= PG15 else "pg_stop_backup(false, false)"
        try:
            lsn, labelfile, spcmap = self.conn.execute(f"SELECT lsn, labelfile, spcmapfile FROM {stop}").fetchone()
        except self._pg.OperationalError as e:
            raise Failed(f"the session holding the backup was lost (server stopped?): {str(e).strip()}; "
                         "the backup ended with it and no backup_label was written") from e
        self.in_backup = False
        facts = {"backup_stop_lsn": str(lsn)}
        try:  # the archive segment a restore must wait for (not answerable on a standby)
            facts["backup_stop_wal_file"] = str(self._one("SELECT pg_walfile_name(%s)", lsn))
        except self._pg.Error:
            pass
        # "unknown" is the Azure extension's every call (handle.py's post_script() takes no argument, and
        # comes after its snapshot): a label for a snapshot that failed is harmless, a missing one makes
        # a taken snapshot unrestorable, so only a snapshot known not to exist goes without.
        if snapshot in ("failed", "skipped"):
            facts["backup_label"] = f"not written: the snapshot is {snapshot}"
            return facts
        try:
            facts["backup_label"] = self._write_label(str(lsn), labelfile, spcmap)
        except OSError as e:
            raise Failed(f"the backup ended (stop LSN {lsn}) but its backup_label could not be written under "
                         f"backupLabelDirectory {self.cfg.backup_label_dir}: {e.strerror or e} "
                         f"({e.filename or ''}); nothing is held") from e
        except PyexecError as e:  # the directory is not (or no longer) one only root can change
            raise Failed(f"the backup ended (stop LSN {lsn}) but its backup_label could not be written under "
                         f"backupLabelDirectory {self.cfg.backup_label_dir}: {e.detail}; nothing is held, "
                         "nothing was written there") from e
        return facts

    def _write_label(self, lsn: str, labelfile: str, spcmap: str | None) -> str:
        """backup_label (and tablespace_map) in a new directory under backupLabelDirectory, root's 0700:
        a restore copies them into the restored data directory before the first start."""
        stamp = self.label.split()[-1]
        # The directory as the check found it: every component root's and not writable by others
        # (missing ones made here, root's 0700), held as an fd; in it a new leaf and new files, none
        # followed through a symlink: root writes nothing where someone else could point it.
        top = trust.open_dir(self.cfg.backup_label_dir, trust.LABEL_DIR, create_mode=0o700)
        try:
            leaf = f"{stamp}-{lsn.replace('/', '_')}"
            os.mkdir(leaf, 0o700, dir_fd=top)
            where = os.open(leaf, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=top)
            try:
                for name, text in (("backup_label", labelfile), ("tablespace_map", spcmap)):
                    if text:
                        fd = os.open(name, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC,
                                     0o600, dir_fd=where)
                        with os.fdopen(fd, "w") as f:
                            f.write(text)
                            f.flush()
                            os.fsync(f.fileno())
                os.fsync(where)
            finally:
                os.close(where)
        finally:
            os.close(top)
        return os.path.join(self.cfg.backup_label_dir, leaf, "backup_label")

    def abort(self) -> None:
        """From the watchdog: cancel the running statement on the server, then cut the socket."""
        conn = self.conn
        if conn is None:
            return
        cancel = getattr(conn, "cancel_safe", None)  # psycopg 3.2: bounded, does not block the loop
        if cancel is not None:
            cancel(timeout=ABORT_CONNECT_S)
        else:
            conn.cancel()
        shutdown_fd(conn.fileno())

    def close(self) -> None:
        """End the session: the server ends a backup still in progress with it."""
        conn, self.conn = self.conn, None
        close_quietly(conn)
        fds, self._fds = self._fds, []
        for fd in fds:
            os.close(fd)


def _unproc(msg: str, host: str) -> str:
    """libpq's message with the checked directory's /proc/self/fd/N path named as configured."""
    return re.sub(r"/proc/self/fd/\d+(?=/\.s\.PGSQL\.)", host, msg)
