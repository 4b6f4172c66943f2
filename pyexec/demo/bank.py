"""The fleet demo's application: one bank branch per simulated host, moving money between hosts.

A branch holds an SQLite ledger (WAL, synchronous=FULL) on its host's own loop mount.  A transfer
debits the local balance and records its id (one committed transaction), then sends a credit over
TCP to another branch, which records the same id and credits its balance (one committed
transaction, idempotent by the id) and acknowledges.  So a cut taken while a transfer is between
the two commits holds it in one ledger only, and the total over all ledgers is off by its amount.

Its pre-script says `quiesce` over a control socket: no new transfer starts, and the reply comes
once every transfer this branch sent is acknowledged and every credit it received is committed,
within a bound.  Credits from branches not quiesced yet are still taken: a receiver never starts a
transfer, and no host freezes before every host is quiesced, so once all are, nothing is in flight.
Its post-script says `resume`.  A quiesce not resumed within its hold bound resumes by itself.

`python -m pyexec.demo.bank serve --host h1 --db DB --listen ADDR:PORT --peer h2=ADDR:PORT ...
--ctl SOCK --balance N` runs a branch; `python -m pyexec.demo.bank ctl CMD SOCK` talks to one."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import socket
import sqlite3
import sys
import threading
import time

WORKERS = 2  # sending threads per branch
MAX_AMOUNT = 100
QUIESCE_S = 10.0  # the drain's bound: a transfer not acknowledged by then fails the pre-script
HOLD_S = 60.0  # a quiesce not resumed within this resumes by itself (the post-script is pyexec's promise)
SEND_S = 30.0  # how long one transfer is retried to an unreachable peer before the worker gives up
IO_S = 5.0  # one socket operation's bound
PAUSE_S = 0.002  # between one worker's transfers: leaves the two cores to the agents and etcd

SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS account (id INTEGER PRIMARY KEY CHECK (id = 1), balance INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS transfers (id TEXT PRIMARY KEY, dir TEXT NOT NULL CHECK (dir IN ('out', 'in')),
                                      peer TEXT NOT NULL, amount INTEGER NOT NULL CHECK (amount > 0));
"""


def connect(db: str) -> sqlite3.Connection:
    """A connection to a ledger in autocommit mode (transactions are explicit), every commit durable."""
    con = sqlite3.connect(db, timeout=30, isolation_level=None, check_same_thread=False)
    con.execute("PRAGMA synchronous=FULL")
    return con


def create(db: str, host: str, balance: int) -> None:
    """Make the ledger of branch host with its opening balance (an existing one is kept)."""
    con = connect(db)
    try:
        con.execute("PRAGMA journal_mode=WAL")
        con.executescript(SCHEMA)
        con.execute("BEGIN IMMEDIATE")
        con.execute("INSERT OR IGNORE INTO meta VALUES ('host', ?), ('opening', ?)", (host, str(balance)))
        con.execute("INSERT OR IGNORE INTO account VALUES (1, ?)", (balance,))
        con.execute("COMMIT")
    finally:
        con.close()


class Branch:
    """One host's branch: sending workers, the credit receiver, and the gate the quiesce closes."""

    def __init__(self, host: str, db: str, peers: dict[str, tuple[str, int]]):
        self.host, self.db, self.peers = host, db, peers
        self.gate = threading.Condition()
        self.open = True
        self.out_flight = 0  # transfers debited here and not acknowledged yet
        self.in_flight = 0  # credits received and not committed yet
        self.sent = self.received = self.given_up = 0
        self.stop = threading.Event()
        self.hold_timer: threading.Timer | None = None
        con = connect(db)
        row = con.execute("SELECT max(CAST(substr(id, length(?) + 2) AS INTEGER)) FROM transfers WHERE dir = 'out'",
                          (host,)).fetchone()
        con.close()
        self.seq = row[0] or 0
        self.seq_lock = threading.Lock()
        # One transaction at a time, queued here rather than in SQLite's busy handler, whose sleeps
        # let the sending workers starve the receivers (and so every peer waiting for an ack).
        self.db_lock = threading.Lock()

    # -- sending ---------------------------------------------------------------------------------

    def worker(self) -> None:
        """Transfers to random peers until stopped; each debited, sent, acknowledged."""
        con = connect(self.db)
        rng = random.Random()
        links: dict[str, socket.socket] = {}
        try:
            while not self.stop.is_set():
                peer = rng.choice(sorted(self.peers))
                link = links.get(peer) or self._link(peer)
                if link is None:
                    self.stop.wait(0.05)  # the peer is not up (yet): nothing was debited
                    continue
                links[peer] = link
                if not self._enter():
                    continue
                try:
                    tid = self._debit(con, peer, rng.randint(1, MAX_AMOUNT), links)
                    if tid is None:
                        continue
                finally:
                    self._leave("out")
                self.stop.wait(PAUSE_S)
        finally:
            for s in links.values():
                s.close()
            con.close()

    def _link(self, peer: str) -> socket.socket | None:
        try:
            return socket.create_connection(self.peers[peer], timeout=IO_S)
        except OSError:
            return None

    def _enter(self) -> bool:
        with self.gate:
            if not self.gate.wait_for(lambda: self.open or self.stop.is_set(), timeout=0.5) or self.stop.is_set():
                return False
            self.out_flight += 1
            return True

    def _leave(self, side: str) -> None:
        with self.gate:
            if side == "out":
                self.out_flight -= 1
            else:
                self.in_flight -= 1
            self.gate.notify_all()

    def _debit(self, con: sqlite3.Connection, peer: str, amount: int, links: dict[str, socket.socket]) -> str | None:
        with self.seq_lock:
            self.seq += 1
            tid = f"{self.host}-{self.seq:08d}"
        with self.db_lock:
            con.execute("BEGIN IMMEDIATE")
            (balance,) = con.execute("SELECT balance FROM account").fetchone()
            if balance < amount:
                con.execute("ROLLBACK")
                return None
            con.execute("UPDATE account SET balance = balance - ?", (amount,))
            con.execute("INSERT INTO transfers VALUES (?, 'out', ?, ?)", (tid, peer, amount))
            con.execute("COMMIT")
        with self.gate:
            self.sent += 1
        self._send(tid, peer, amount, links)
        return tid

    def _send(self, tid: str, peer: str, amount: int, links: dict[str, socket.socket]) -> None:
        """Send the credit until acknowledged (the receiver applies an id once), within SEND_S."""
        deadline = time.monotonic() + SEND_S
        msg = f"CREDIT {tid} {self.host} {amount}\n".encode()
        while time.monotonic() < deadline:
            link = links.get(peer) or self._link(peer)
            if link is not None:
                links[peer] = link
                try:
                    link.sendall(msg)
                    if _readline(link) == f"ACK {tid}":
                        return
                except OSError:
                    pass
                link.close()
                links.pop(peer, None)
            if self.stop.wait(0.1):
                return
        with self.gate:
            self.given_up += 1  # left half-done in the live system: the ledgers say so

    # -- receiving -------------------------------------------------------------------------------

    def listen(self, srv: socket.socket) -> None:
        """Accept the peers' links, one thread each."""
        while not self.stop.is_set():
            try:
                conn, _ = srv.accept()
            except OSError:
                return
            threading.Thread(target=self._receive, args=(conn,), daemon=True).start()

    def _receive(self, conn: socket.socket) -> None:
        con = connect(self.db)
        try:
            with conn:
                conn.settimeout(None)  # a link idles while its sender's host is quiesced
                while True:
                    line = _readline(conn)
                    parts = line.split()
                    if len(parts) != 4 or parts[0] != "CREDIT":
                        return
                    tid, sender, amount = parts[1], parts[2], int(parts[3])
                    with self.gate:
                        self.in_flight += 1
                    try:
                        with self.db_lock:
                            con.execute("BEGIN IMMEDIATE")
                            cur = con.execute("INSERT OR IGNORE INTO transfers VALUES (?, 'in', ?, ?)",
                                              (tid, sender, amount))
                            if cur.rowcount == 1:
                                con.execute("UPDATE account SET balance = balance + ?", (amount,))
                            con.execute("COMMIT")
                        if cur.rowcount == 1:
                            with self.gate:
                                self.received += 1
                    finally:
                        self._leave("in")
                    conn.sendall(f"ACK {tid}\n".encode())
        except (OSError, ValueError):
            return
        finally:
            con.close()

    # -- control ---------------------------------------------------------------------------------

    def quiesce(self, bound: float) -> tuple[bool, str]:
        """Stop new transfers and drain those in flight, within bound seconds."""
        with self.gate:
            self.open = False
            drained = self.gate.wait_for(lambda: self.out_flight == 0 and self.in_flight == 0, timeout=bound)
            self._arm_hold()
            state = self._state()
        return drained, state

    def _arm_hold(self) -> None:
        if self.hold_timer:
            self.hold_timer.cancel()
        self.hold_timer = threading.Timer(HOLD_S, self.resume)
        self.hold_timer.daemon = True
        self.hold_timer.start()

    def resume(self) -> str:
        """Let transfers start again."""
        with self.gate:
            if self.hold_timer:
                self.hold_timer.cancel()
                self.hold_timer = None
            self.open = True
            self.gate.notify_all()
            return self._state()

    def _state(self) -> str:
        return json.dumps({"host": self.host, "open": self.open, "sent": self.sent, "received": self.received,
                           "out_flight": self.out_flight, "in_flight": self.in_flight, "given_up": self.given_up})

    def stats(self) -> str:
        """Counters and the gate, as JSON."""
        with self.gate:
            return self._state()


def _readline(s: socket.socket) -> str:
    """One line from s (the protocol's lines are short and one request waits for its reply)."""
    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = s.recv(1)
        if not chunk:
            raise ConnectionError("link closed")
        buf += chunk
        if len(buf) > 256:
            raise ValueError("line too long")
    return buf.decode().strip()


def serve(args: argparse.Namespace) -> None:
    """Run one branch until told `exit` (or killed)."""
    create(args.db, args.host, args.balance)
    peers = {}
    for p in args.peer:
        name, _, addr = p.partition("=")
        ip, _, port = addr.rpartition(":")
        peers[name] = (ip, int(port))
    b = Branch(args.host, args.db, peers)
    ip, _, port = args.listen.rpartition(":")
    srv = socket.create_server((ip, int(port)), backlog=64)
    ctl = socket.socket(socket.AF_UNIX)
    with contextlib.suppress(FileNotFoundError):
        os.unlink(args.ctl)
    ctl.bind(args.ctl)
    os.chmod(args.ctl, 0o600)
    ctl.listen()
    threading.Thread(target=b.listen, args=(srv,), daemon=True).start()
    for _ in range(WORKERS):
        threading.Thread(target=b.worker, daemon=True).start()
    print("ready", flush=True)
    while True:
        conn, _ = ctl.accept()
        with conn:
            conn.settimeout(IO_S)
            try:
                words = _readline(conn).split()
            except (OSError, ValueError):
                continue
            cmd = words[0] if words else ""
            if cmd == "quiesce":
                ok, state = b.quiesce(float(words[1]) if len(words) > 1 else QUIESCE_S)
                reply = ("quiesced " if ok else "timeout ") + state
            elif cmd == "resume":
                reply = "resumed " + b.resume()
            elif cmd == "stats":
                reply = "stats " + b.stats()
            elif cmd == "exit":
                b.stop.set()
                reply = "exit " + b.stats()
            else:
                reply = "error unknown command"
            with contextlib.suppress(OSError):
                conn.sendall(reply.encode() + b"\n")
            if cmd == "exit":
                srv.close()
                return


def ctl(cmd: str, sock: str, timeout: float = QUIESCE_S + IO_S) -> str:
    """Send one control command to a branch; its reply line."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(timeout)
        s.connect(sock)
        s.sendall(cmd.encode() + b"\n")
        return _readline(s)


def main(argv: list[str]) -> int:
    """`serve` a branch, or send it one `ctl` command (exit 0 only on a quiesced or resumed reply)."""
    ap = argparse.ArgumentParser(prog="python -m pyexec.demo.bank")
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve")
    s.add_argument("--host", required=True)
    s.add_argument("--db", required=True)
    s.add_argument("--listen", required=True)
    s.add_argument("--peer", action="append", default=[])
    s.add_argument("--ctl", required=True)
    s.add_argument("--balance", type=int, required=True)
    c = sub.add_parser("ctl")
    c.add_argument("command", choices=("quiesce", "resume", "stats", "exit"))
    c.add_argument("sock")
    args = ap.parse_args(argv)
    if args.cmd == "serve":
        serve(args)
        return 0
    try:
        reply = ctl(args.command, args.sock)
    except OSError as e:
        print(f"bank ctl {args.command}: {e}", file=sys.stderr)
        return 1
    print(reply)
    return 0 if reply.split()[0] in ("quiesced", "resumed", "stats", "exit") else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
