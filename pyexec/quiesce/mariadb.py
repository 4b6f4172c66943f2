"""The MariaDB / MySQL quiescer: FLUSH TABLES WITH READ LOCK held by pyexec's own session across the
window, the binlog position and GTID recorded, UNLOCK TABLES after the thaw.

The lock waits for running statements to finish (and blocks every new writer while it waits), so the
wait is bounded twice: the server's lock_wait_timeout (lockWaitTimeoutInSeconds), and the plugin's
deadline, at which a second connection KILLs the session (MariaDB KB, "FLUSH": FTWRL and long queries)."""
from __future__ import annotations

from types import ModuleType
from typing import Any

from pyexec import dbconfig
from pyexec.errors import ScriptError
from pyexec.quiesce import endpoint
from pyexec.quiesce.session import ABORT_CONNECT_S, Failed, close_quietly, shutdown_fd

ER_LOCK_WAIT_TIMEOUT = 1205
ER_ACCESS_DENIED = (1044, 1045, 1698)  # database, password, socket-auth user
ER_SPECIFIC_ACCESS_DENIED = 1227  # needs RELOAD
# The authentication plugins PyMySQL answers with the password itself, or with what gives it back:
# clear text (mysql_clear_password, dialog's "Password: "), RSA to a key the server chooses
# (sha256_password, caching_sha2_password's full authentication), a broken hash (mysql_old_password).
# Refused where TLS does not authenticate the server; left: mysql_native_password, client_ed25519.
CLEAR_PLUGINS = ("mysql_clear_password", "dialog", "sha256_password", "caching_sha2_password", "mysql_old_password")
# What TCP needs of PyMySQL (Connection._request_authentication): before 1.2.0 an SSLContext did not
# make TLS required (a server that did not offer it got the login in clear, a switch to
# mysql_clear_password the password); before 1.2.1 auth_plugin_map was asked about a switch only, so
# the handshake's own caching_sha2_password (full authentication) or sha256_password RSA-encrypted
# the password to whatever public key the server sent.
PYMYSQL_TCP = (1, 2, 1)


def check_driver(cfg: dbconfig.DatabaseConfig, driver: ModuleType) -> None:
    """ScriptError 300 if cfg is TCP and this PyMySQL would send the password to a server it did not
    authenticate (a Unix socket's peer is checked by pyexec itself)."""
    if cfg.socket:
        return
    version = tuple(driver.VERSION[:3])
    if version < PYMYSQL_TCP:
        raise ScriptError(300, f"a server reached over TCP needs PyMySQL 1.2.1 or later, which requires the TLS it "
                               f"is given and refuses the plugins that would send the password recoverably, and "
                               f"PyMySQL is {'.'.join(map(str, version))}: upgrade it, or use a Unix socket path "
                               "as host", cfg.path)


class MariaDBSession:
    """One PyMySQL connection, autocommit; the read lock lives exactly as long as it."""

    def __init__(self, cfg: dbconfig.DatabaseConfig, password: str, driver: ModuleType, ep: endpoint.Endpoint):
        self.cfg = cfg
        self._password = password
        self._my = driver
        self._ep = ep
        self.conn: Any = None
        self.thread_id = 0

    def _connection(self, timeout_s: float) -> Any:
        """A connection not yet connected, whose every read and write is bounded by timeout_s too:
        PyMySQL's connect_timeout bounds only the socket's connect, not the handshake, which a hung
        server never answers."""
        bound = max(1, int(timeout_s))
        tls: dict[str, Any] = {"ssl_disabled": True}
        if not self.cfg.socket:
            if self.cfg.tls == "verify-full":
                # An SSLContext makes TLS required (PyMySQL 1.2.0+, check_driver: "SSL is required but the
                # server doesn't support it" rather than a fall back to clear text), before the handshake response.
                tls = {"ssl": self._ep.ssl_context()}
            else:
                tls["auth_plugin_map"] = {p: endpoint.refuse_plugin(p) for p in CLEAR_PLUGINS}
        return self._my.connect(host=self.cfg.host if not self.cfg.socket else "localhost", port=self.cfg.port,
                                user=self.cfg.user, password=self._password, database=self.cfg.database or None,
                                connect_timeout=bound, read_timeout=bound, write_timeout=bound, autocommit=True,
                                defer_connect=True, **tls)

    def _handshake(self, conn: Any, timeout_s: float) -> None:
        """Connect conn: over a Unix socket, one whose peer was checked before PyMySQL writes to it."""
        if not self.cfg.socket:
            conn.connect()
            return
        sock = self._ep.connect_unix(max(1, timeout_s))
        # PyMySQL marks the Unix sockets it opens itself as secure (Connection.connect), which lets
        # MySQL 8's caching_sha2_password finish without RSA; this one's server is authenticated.
        conn._secure = True
        conn.connect(sock)

    def _connect(self, timeout_s: float) -> Any:
        conn = self._connection(timeout_s)
        self._handshake(conn, timeout_s)
        return conn

    def _rows(self, sql: str) -> list[tuple[Any, ...]]:
        with self.conn.cursor() as cur:
            cur.execute(sql)
            return list(cur.fetchall())

    def open(self, timeout_s: float) -> None:
        """Connect to the authenticated server, and bound the lock wait on the server's side."""
        where = self._ep.where
        try:
            # Deferred: self.conn exists during the handshake, so the watchdog's abort can cut its socket.
            self.conn = self._connection(timeout_s)
            self._handshake(self.conn, timeout_s)
        except endpoint.Refused as e:
            raise Failed(f"MariaDB at {where}: {e}") from e
        except OSError as e:  # the socket: missing, nobody listening, or the connect timed out
            raise Failed(f"cannot connect: MariaDB at {where} as {self.cfg.user}: {e.strerror or e}") from e
        except self._my.err.OperationalError as e:
            code = e.args[0] if e.args else 0
            what = "access denied (user or password)" if code in ER_ACCESS_DENIED else "cannot connect"
            raise Failed(f"{what}: MariaDB at {where} as {self.cfg.user}: {e.args[-1]}") from e
        self.thread_id = self.conn.thread_id()
        self._rows(f"SET SESSION lock_wait_timeout = {self.cfg.lock_wait}")

    def quiesce(self, filesystems: int) -> dict[str, str]:
        """FLUSH TABLES WITH READ LOCK; the binlog position and GTID it holds still."""
        try:
            self._rows("FLUSH TABLES WITH READ LOCK")
        except self._my.err.OperationalError as e:
            code = e.args[0] if e.args else 0
            if code == ER_LOCK_WAIT_TIMEOUT:
                raise Failed(f"FLUSH TABLES WITH READ LOCK waited lockWaitTimeoutInSeconds "
                             f"({self.cfg.lock_wait}s) behind {self._blockers()}; nothing is held") from e
            if code == ER_SPECIFIC_ACCESS_DENIED:
                raise Failed(f"FLUSH TABLES WITH READ LOCK refused: {self.cfg.user} needs the RELOAD privilege") from e
            raise
        facts: dict[str, str] = {"locked": "FLUSH TABLES WITH READ LOCK"}
        if self.cfg.flush_logs:
            # Under the read lock the InnoDB redo log is flushed to disk: the snapshot has every commit.
            self._rows("FLUSH NO_WRITE_TO_BINLOG ENGINE LOGS")
        facts.update(self._position())
        return facts

    def _position(self) -> dict[str, str]:
        """The binlog position and GTID set under the lock; what cannot be read is said, not fatal
        (the lock is what the snapshot needs)."""
        facts: dict[str, str] = {}
        try:
            try:
                rows = self._rows("SHOW MASTER STATUS")
            except self._my.err.ProgrammingError:  # MySQL 8.4 renamed it
                rows = self._rows("SHOW BINARY LOG STATUS")
            if rows:
                facts["binlog_file"], facts["binlog_position"] = str(rows[0][0]), str(rows[0][1])
            else:
                facts["binlog"] = "off: log_bin is not enabled"
            gtid = self._rows("SELECT @@GLOBAL.gtid_binlog_pos" if self._is_mariadb()
                              else "SELECT @@GLOBAL.gtid_executed")
            if gtid and gtid[0][0]:
                facts["gtid"] = str(gtid[0][0])
        except self._my.err.MySQLError as e:
            if isinstance(e, self._my.err.OperationalError) and e.args and e.args[0] >= 2000:
                raise  # the client lost the server: the hold is gone, the quiesce fails
            facts["binlog"] = f"unavailable: {e.args[-1] if e.args else e}"
        return facts

    def _is_mariadb(self) -> bool:
        return "MariaDB" in str(self.conn.get_server_info())

    def _blockers(self) -> str:
        """The longest-running statements of other sessions: what the lock waited for."""
        try:
            rows = self._rows("SELECT ID, TIME, LEFT(COALESCE(INFO, ''), 80) FROM information_schema.PROCESSLIST "
                              "WHERE ID != CONNECTION_ID() AND COMMAND NOT IN ('Sleep', 'Daemon', 'Binlog Dump') "
                              "ORDER BY TIME DESC LIMIT 3")
        except Exception:  # noqa: BLE001 - only the detail of a message
            return "other sessions' statements"
        if not rows:
            return "other sessions' statements"
        return "; ".join(f"session {i} running {t}s: {q!r}" for i, t, q in rows)

    def release(self, snapshot: str) -> dict[str, str]:
        """UNLOCK TABLES, on the session that holds the lock."""
        try:
            self._rows("UNLOCK TABLES")
        except (self._my.err.OperationalError, self._my.err.InterfaceError) as e:
            raise Failed(f"the session holding the read lock was lost (server stopped or restarted?): "
                         f"{e.args[-1] if e.args else e}; the lock ended with it") from e
        return {}

    def abort(self) -> None:
        """From the watchdog: KILL the session on the server (its wait and its lock end), cut the socket."""
        if self.conn is None:
            return
        try:
            if not self.thread_id:  # still in the handshake: there is no session to KILL yet
                return
            killer = self._connect(ABORT_CONNECT_S)
            try:
                with killer.cursor() as cur:
                    cur.execute(f"KILL {int(self.thread_id)}")
            finally:
                killer.close()
        finally:
            sock = getattr(self.conn, "_sock", None)
            if sock is not None:
                shutdown_fd(sock.fileno())

    def close(self) -> None:
        """End the session: the server releases a read lock still held with it."""
        conn, self.conn = self.conn, None
        close_quietly(conn)
