"""What every database engine's session (postgresql.py, mariadb.py) is and builds on: the Session
protocol a Quiescer drives, the failure a step raises, and cutting a connection short."""
from __future__ import annotations

import contextlib
import os
import socket
from typing import Any, Protocol

ABORT_CONNECT_S = 2  # the second connection that cancels a statement on the server side


class Failed(Exception):
    """A quiesce or release step failed; detail says what and what is (not) held."""


class Session(Protocol):
    """One engine's session: what a Quiescer drives, in this order, each step bounded by a watchdog."""

    def open(self, timeout_s: float) -> None: ...

    def quiesce(self, filesystems: int) -> dict[str, str]: ...

    def release(self, snapshot: str) -> dict[str, str]: ...

    def abort(self) -> None: ...

    def close(self) -> None: ...


def shutdown_fd(fd: int) -> None:
    """Cut a connection's socket in both directions, so a blocked client call returns at once and
    the server sees the session end (and drops its locks)."""
    with contextlib.suppress(OSError), socket.socket(fileno=os.dup(fd)) as s:
        s.shutdown(socket.SHUT_RDWR)


def close_quietly(conn: Any) -> None:
    """Close a driver connection if there is one (a lost one is closed already)."""
    if conn is not None:
        try:
            conn.close()
        except Exception:  # noqa: BLE001, S110 - whatever the driver raises, the session is over
            pass
