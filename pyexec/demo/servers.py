"""Private PostgreSQL and MariaDB instances in the sandbox: the real servers the database quiescers
are tested and demonstrated against.

Each instance is one data directory (and, optionally, a second directory on another filesystem for
the write-ahead log: PostgreSQL's pg_wal, MariaDB's binlog and InnoDB redo log), reached only over a
Unix socket in a private run directory; neither server listens on TCP.  `stop()` and the context
managers leave no server process, socket or run directory behind, whatever happened.  A copy of the
directories (a restored snapshot) starts as a new instance with `start(existing=True)`, which runs
the engine's crash recovery and reports how long it took (`Startup`).  PostgreSQL can also archive
its WAL (`archive_dir`) and start a restored copy by archive recovery from a backup_label
(`start_archive_recovery`): the restore of a snapshot whose pieces are not one atomic image.

This module is their face; the servers live in pgserver.py and mariadbserver.py, what they share in
dbserver.py, their processes in processes.py."""
from __future__ import annotations

from pyexec.demo.dbserver import ServerError, Startup
from pyexec.demo.mariadbserver import MariaDBServer
from pyexec.demo.pgserver import PostgresServer

__all__ = ["MariaDBServer", "PostgresServer", "ServerError", "Startup"]
