"""The ledger: one client inserting numbered rows (round, seq) in autocommit, one after the other,
each row's send and acknowledgement instants recorded outside the frozen disks; and what a restored
copy's ledger must hold, judged against the instants of the run (`Stamps`)."""
from __future__ import annotations

import dataclasses
import threading
import time
from collections.abc import Callable
from typing import Any

from pyexec.demo.dbload import client_session
from pyexec.demo.servers import MariaDBServer, PostgresServer


@dataclasses.dataclass
class Stamps:
    """Monotonic instants of the run, from its progress lines and its window."""

    pre_start: int = 0
    pre_end: int = 0  # the pre-phase returned: the quiesce is held (an upper bound of the lock's instant)
    post_start: int = 0  # the release begins (a lower bound of the unlock's instant)
    freeze_start: int = 0
    thaw_end: int = 0
    # The log disk's FIFREEZE (pg_wal; binlog + redo): a commit is durable once its log record is, so
    # this is a crash-consistent snapshot's consistency point.
    log_freeze_start: int = 0
    log_freeze_end: int = 0
    released: int = 0  # host.run returned: the release (pg_backup_stop, UNLOCK TABLES) is over


class Ledger:
    """One client inserting rows (round, seq) in autocommit, one after the other; each row's
    monotonic send and acknowledgement times go to a file outside the frozen disks."""

    def __init__(self, connect: Callable[[], Any], rnd: int, path: str):
        self.connect, self.rnd, self.path = connect, rnd, path
        self.rows: list[tuple[int, int, int]] = []  # (seq, sent_ns, acked_ns)
        self.sent: tuple[int, int] | None = None  # the row sent and not acknowledged yet
        self.error: str | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="demo-ledger", daemon=True)

    def _run(self) -> None:
        client_session(self.connect, self.stop, self._write, self._failed)

    def _write(self, conn: Any) -> None:
        with open(self.path, "w", buffering=1) as log:
            seq = 0
            while not self.stop.is_set():
                seq += 1
                sent = time.monotonic_ns()
                self.sent = (seq, sent)
                conn.cursor().execute("INSERT INTO ledger (round, seq, sent_ns) VALUES (%s, %s, %s)",
                                      (self.rnd, seq, sent))
                acked = time.monotonic_ns()
                self.sent = None
                self.rows.append((seq, sent, acked))
                log.write(f"{seq}\t{sent}\t{acked}\n")

    def _failed(self, error: str) -> None:
        self.error = error

    def start(self) -> None:
        """Start writing."""
        self.thread.start()

    def finish(self) -> None:
        """Stop writing (the row in flight, if any, is left to its fate)."""
        self.stop.set()
        self.thread.join(30)


def restored_rows(server: PostgresServer | MariaDBServer, rnd: int) -> set[int]:
    """The seq of every row of round rnd in a (restored) server's ledger."""
    sql = f"SELECT seq FROM ledger WHERE round = {rnd}"
    text = server.psql(sql, dbname="bench") if isinstance(server, PostgresServer) else server.sql(sql, database="demo")
    return {int(x) for x in text.split()}


def check_crash_restore(ledger: Ledger, present: set[int], st: Stamps, locked: bool, out: dict[str, Any],
                        checks: dict[str, bool]) -> None:
    """The ledger restored from the snapshot by crash recovery: every row acknowledged before the log
    disk's freeze, none sent after it, gapless; locked (MariaDB's read lock held): exactly the rows
    acknowledged before the lock.  Its figures go to out["ledger"], its verdicts to checks."""
    rows = ledger.rows
    # The log disk stops taking writes somewhere inside its FIFREEZE call: a row whose span overlaps
    # the call is in flight (either way is right); the ledger's one writer makes them few.
    f0, f1 = st.log_freeze_start, st.log_freeze_end
    acked_before = {s for s, sent, ack in rows if ack < f0}
    sent_after = {s for s, sent, ack in rows if sent > f1}
    in_flight = [s for s, sent, ack in rows if sent < f1 and ack > f0]
    if ledger.sent is not None and ledger.sent[1] < f1:  # stopped while waiting (an error): still in flight
        in_flight.append(ledger.sent[0])
    top = max(present, default=0)
    doc: dict[str, Any] = {
        "rows_written": len(rows), "rows_restored": len(present), "last_restored": top,
        "acked_before_log_freeze": len(acked_before), "missing_acked_before_log_freeze": len(acked_before - present),
        "sent_after_log_frozen": len(sent_after), "present_sent_after_log_frozen": len(sent_after & present),
        "in_flight": len(in_flight), "in_flight_present": sum(s in present for s in in_flight)}
    checks["ledger: every row acknowledged before the log disk's freeze began is present"] = not acked_before - present
    checks["ledger: no row sent after the log disk was frozen is present"] = not sent_after & present
    checks["ledger: gapless (rows 1..last)"] = present == set(range(1, top + 1))
    if locked:
        # The lock was held from pre_end (at the latest) to post_start (at the earliest): a row sent in
        # that span cannot commit before UNLOCK TABLES, and none is acknowledged inside it.
        q, rel = st.pre_end, st.post_start
        acked_before_release = {s for s, sent, ack in rows if ack < rel}
        committed_locked = [s for s, sent, ack in rows if sent > q and ack < rel]
        waited = [(s, sent, ack) for s, sent, ack in rows if sent < q and ack > rel]
        doc |= {"lock_held_ms": round((rel - q) / 1e6, 3), "acked_before_release": len(acked_before_release),
                "committed_while_locked": len(committed_locked),
                "waited_for_the_lock": [{"seq": s, "waited_ms": round((ack - sent) / 1e6, 1)} for s, sent, ack in waited]}
        checks["ledger: nothing committed while the read lock was held"] = not committed_locked
        checks["ledger: restored = exactly the rows acknowledged before the lock"] = present == acked_before_release
    out["ledger"] = doc


def check_label_restore(ledger: Ledger, present: set[int], st: Stamps, out: dict[str, Any],
                        checks: dict[str, bool]) -> None:
    """The ledger restored by archive recovery to the backup's stop LSN: every row acknowledged before
    the release began, gapless, none sent after the release ended.  As check_crash_restore."""
    rows = ledger.rows
    # The state at the stop LSN: pg_backup_stop runs in the release, after the thaw.
    acked_before_release = {s for s, sent, ack in rows if ack < st.post_start}
    sent_after_release = {s for s, sent, ack in rows if sent > st.released}
    top = max(present, default=0)
    out["ledger"] = {"rows_restored": len(present), "last_restored": top,
                     "acked_before_freeze": sum(ack < st.freeze_start for s, sent, ack in rows),
                     "acked_before_release": len(acked_before_release),
                     "missing_acked_before_release": len(acked_before_release - present),
                     "sent_after_release": len(sent_after_release),
                     "present_sent_after_release": len(sent_after_release & present)}
    checks["ledger: every row acknowledged before the release began is present"] = (
        not acked_before_release - present)
    checks["ledger: gapless (rows 1..last)"] = present == set(range(1, top + 1))
    checks["ledger: no row sent after the release ended is present"] = not sent_after_release & present
