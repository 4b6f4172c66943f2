"""A built-in quiescer's JSON config (PostgreSQL, MariaDB): the engines' defaults, their keys, and
the parser that checks them together (how the server is authenticated, the lock wait under the bound)."""
from __future__ import annotations

import dataclasses
from typing import Any

from pyexec.config import HOST_TIMEOUT_MAX, PLUGIN_TIMEOUT_DEFAULT, Kind, Problems, clamp_timeout, parse_json
from pyexec.errors import ConfigError

# Where a built-in quiescer connects when its config names no host: the distributions' sockets.
# serverUser: the OS account the distributions' packages run the server as (Debian, RHEL, SUSE alike).
DB_DEFAULTS = {"postgresql": {"host": "/var/run/postgresql", "port": 5432, "user": "postgres",
                              "database": "postgres", "server_user": "postgres"},
               "mariadb": {"host": "/run/mysqld/mysqld.sock", "port": 3306, "user": "root", "database": "",
                           "server_user": "mysql"}}
# How a quiescer authenticates a server it reaches over TCP before it sends the password (docs/security-quiescers.md):
# verify-full: TLS, the certificate signed by tlsCAFile's CA and naming host; disable: no TLS (insecure).
TLS_MODES = ("verify-full", "disable")
PG_BACKUP_LABEL_DIR = "/var/lib/pyexec/postgresql"
PG_BACKUP_MODES = ("auto", "always", "never")
LOCK_WAIT_DEFAULT = 10  # seconds FLUSH TABLES WITH READ LOCK may wait (lock_wait_timeout)


@dataclasses.dataclass(frozen=True)
class DatabaseConfig:
    """A built-in quiescer's JSON config; `timeout` (each of quiesce and release) is min(plugin, host)."""

    path: str
    engine: str  # postgresql | mariadb
    host: str  # a hostname, or an absolute path: PostgreSQL's socket directory, MariaDB's socket file
    port: int
    user: str
    database: str
    credentials_file: str = ""  # its first line is the password
    timeout: int = PLUGIN_TIMEOUT_DEFAULT
    host_limit: bool = False
    continue_on_failure: bool = True
    fs_freeze: bool = True
    lock_wait: int = LOCK_WAIT_DEFAULT
    flush_logs: bool = True
    backup_mode: str = "auto"
    backup_label_dir: str = PG_BACKUP_LABEL_DIR
    server_user: str = ""  # the OS account whose socket is the server's (Unix sockets)
    tls: str = TLS_MODES[0]
    tls_ca_file: str = ""  # the CA that signed the server's certificate (TCP)
    warnings: tuple[str, ...] = ()

    @property
    def socket(self) -> bool:
        """The server is reached over a Unix socket (host is a path), not TCP."""
        return self.host.startswith("/")


def _db_keys(engine: str) -> dict[str, tuple[str | None, Kind, object]]:
    d = DB_DEFAULTS[engine]
    keys: dict[str, tuple[str | None, Kind, object]] = {
        "host": ("host", "str", d["host"]),
        "port": ("port", "port", d["port"]),
        "user": ("user", "str", d["user"]),
        "database": ("database", "str", d["database"]),
        "credentialsFile": ("credentials_file", "path", ""),
        "timeoutInSeconds": ("timeout", "timeout", PLUGIN_TIMEOUT_DEFAULT),
        "continueBackupOnFailure": ("continue_on_failure", "bool", True),
        "fsFreezeEnabled": ("fs_freeze", "bool", True),
        "serverUser": ("server_user", "str", d["server_user"]),
        "tls": ("tls", TLS_MODES, TLS_MODES[0]),
        "tlsCAFile": ("tls_ca_file", "path", ""),
    }
    if engine == "mariadb":
        keys["lockWaitTimeoutInSeconds"] = ("lock_wait", "timeout", 0)  # 0: not given (parse_database)
        keys["flushLogs"] = ("flush_logs", "bool", True)
    else:
        keys["backupMode"] = ("backup_mode", PG_BACKUP_MODES, "auto")
        keys["backupLabelDirectory"] = ("backup_label_dir", "path", PG_BACKUP_LABEL_DIR)
    return keys


def _check_server(fields: dict[str, Any], warnings: list[str], path: str, engine: str) -> None:
    """The keys that say how the server is authenticated, together (docs/security-quiescers.md)."""
    host, errors = fields["host"], []
    if not host or host.startswith("@") or "," in host:
        # libpq reads "@name" as an abstract Unix socket (anyone may bind one) and "a,b" as a list of hosts.
        errors.append(ConfigError(305, f"must be one host name or address, or an absolute socket path, not {host!r}",
                                  path, "host"))
    if not fields["server_user"].strip():
        errors.append(ConfigError(305, "must name the OS account the database server runs as", path, "serverUser"))
    if not errors and not host.startswith("/") and fields["tls"] == "verify-full" and not fields["tls_ca_file"]:
        errors.append(ConfigError(
            305, f"host {host!r} is reached over TCP, where anyone who binds the port while the server is down "
                 "would receive the password: set tlsCAFile to the CA file that signed the server's certificate "
                 "(its name must match host), or use a Unix socket path as host; \"tls\": \"disable\" sends it "
                 "unauthenticated (insecure)", path, "tlsCAFile"))
    if errors:
        raise Problems(errors)
    if not host.startswith("/") and fields["tls"] == "disable":
        refused = "clear-text and MD5 password authentication are refused (require_auth=scram-sha-256)" \
            if engine == "postgresql" else "plugins that would send the password in clear are refused"
        warnings.append(f"tls is disable: the server at {host} is not authenticated; {refused}, but a program "
                        "listening on the port can still attack what it receives offline")
    elif host.startswith("/") and (fields["tls_ca_file"] or fields["tls"] != TLS_MODES[0]):
        warnings.append("tls and tlsCAFile apply to TCP only: a Unix socket's server is authenticated by its "
                        "peer credentials (serverUser)")


def parse_database(data: bytes, path: str, engine: str, host_timeout: int = HOST_TIMEOUT_MAX) -> DatabaseConfig:
    """Parse a built-in quiescer's config (engine: postgresql | mariadb); Problems (305) lists every bad key."""
    fields, warnings = parse_json(data, path, _db_keys(engine), {})
    _check_server(fields, warnings, path, engine)
    if engine == "mariadb":
        bound = min(fields["timeout"], host_timeout)
        if bound < 2:
            raise Problems([ConfigError(305, f"must be at least 2 for MariaDB, not {bound}: the lock wait (1 s "
                                             "at least) must end before it", path, "timeoutInSeconds")])
        if not fields["lock_wait"]:  # not given: the default, shortened to fit below the timeout
            fields["lock_wait"] = min(LOCK_WAIT_DEFAULT, bound - 1)
        elif fields["lock_wait"] >= bound:
            raise Problems([ConfigError(305, f"must be less than timeoutInSeconds ({bound}): the lock "
                                             "wait is part of the quiesce's bound", path, "lockWaitTimeoutInSeconds")])
    clamp_timeout(fields, warnings, host_timeout)
    return DatabaseConfig(path=path, engine=engine, warnings=tuple(warnings), **fields)
