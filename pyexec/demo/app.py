"""The demo's application: SQLite (WAL) writers and an append-only log, quiesced over a
Unix socket.  `python -m pyexec.demo.app serve DB LOG SOCK` runs it; `... ctl CMD SOCK`
talks to it (the demo's pre/post scripts do that)."""
from __future__ import annotations

import os
import socket
import sqlite3
import sys
import threading
import time

WRITERS = 4


class App:
    """Writers that commit numbered rows, and a log writer, behind one gate."""

    def __init__(self, db: str, log: str):
        self.db, self.log_path = db, log
        self.gate = threading.Condition()
        self.open = True
        self.in_flight = 0
        self.last_row = 0
        self.log_seq = 0
        self.stop = False
        con = sqlite3.connect(db)
        con.execute("PRAGMA journal_mode=WAL")
        con.execute("CREATE TABLE IF NOT EXISTS rows (id INTEGER PRIMARY KEY, writer INT, payload TEXT)")
        con.commit()
        con.close()
        self.log = open(log, "ab", buffering=0)

    def _enter(self) -> None:
        with self.gate:
            while not self.open:
                self.gate.wait()
            self.in_flight += 1

    def _leave(self) -> None:
        with self.gate:
            self.in_flight -= 1
            self.gate.notify_all()

    def writer(self, wid: int) -> None:
        con = sqlite3.connect(self.db, timeout=30, isolation_level=None)
        n = 0
        while not self.stop:
            self._enter()
            try:
                con.execute("BEGIN IMMEDIATE")
                cur = con.execute("INSERT INTO rows (writer, payload) VALUES (?, ?)", (wid, f"w{wid}-{n}" * 8))
                con.execute("COMMIT")
                with self.gate:
                    self.last_row = max(self.last_row, cur.lastrowid or 0)  # an INSERT always sets it
                self._log(f"row {cur.lastrowid} by writer {wid}")
            finally:
                self._leave()
            n += 1
            time.sleep(0.001)

    def _log(self, text: str) -> None:
        with self.gate:
            self.log_seq += 1
            body = f"{self.log_seq} {text}"
            self.log.write(f"{len(body):06d} {body}\n".encode())

    def quiesce(self) -> str:
        with self.gate:
            self.open = False
            while self.in_flight:
                self.gate.wait()
        con = sqlite3.connect(self.db, timeout=30)
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        con.close()
        os.fsync(self.log.fileno())
        return f"{self.last_row} {self.log_seq}"

    def resume(self) -> str:
        with self.gate:
            self.open = True
            self.gate.notify_all()
        return "resumed"

    def stats(self) -> str:
        return f"{self.last_row} {self.log_seq}"


def serve(db: str, log: str, sock_path: str) -> None:
    app = App(db, log)
    for i in range(WRITERS):
        threading.Thread(target=app.writer, args=(i,), daemon=True).start()
    with socket.socket(socket.AF_UNIX) as srv:
        srv.bind(sock_path)
        srv.listen()
        print("ready", flush=True)
        while True:
            conn, _ = srv.accept()
            with conn:
                cmd = conn.recv(64).decode().strip()
                reply = {"quiesce": app.quiesce, "resume": app.resume, "stats": app.stats}.get(cmd, lambda: "?")()
                conn.sendall(reply.encode())
                if cmd == "exit":
                    return


def ctl(cmd: str, sock_path: str) -> str:
    """Send one command to the app; its reply."""
    with socket.socket(socket.AF_UNIX) as s:
        s.settimeout(30)
        s.connect(sock_path)
        s.sendall(cmd.encode())
        return s.recv(256).decode()


if __name__ == "__main__":
    if sys.argv[1] == "serve":
        serve(*sys.argv[2:5])
    else:
        print(ctl(sys.argv[2], sys.argv[3]))
