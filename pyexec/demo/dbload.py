"""The database demo's load: pgbench in the background (PostgreSQL), or PyMySQL clients moving money
between accounts (MariaDB); each transaction's span recorded, to count those open across the freeze
window.  `client_session` runs one writer's session (the ledger's too), its errors recorded."""
from __future__ import annotations

import contextlib
import glob
import os
import random
import subprocess
import threading
import time
from collections.abc import Callable
from typing import Any

from pyexec.demo.output import say
from pyexec.demo.servers import PostgresServer

PGBENCH_SCALE = 1  # 100 000 accounts, ~15 MB
PGBENCH_CLIENTS = 4
PGBENCH_SECONDS = 5  # covers warm-up, the run (pre, window, post) and the load after the release
MARIADB_WRITERS = 3
MARIADB_ACCOUNTS = 1000


def client_session(connect: Callable[[], Any], stop: threading.Event, work: Callable[[Any], None],
                   error: Callable[[str], None]) -> None:
    """work(conn) on a new session, which is closed afterwards; a failure to connect, or an exception
    before stop is set, goes to error as text (the round fails on it), never raised."""
    try:
        conn = connect()
    except Exception as e:  # noqa: BLE001 - reported, and the round fails on it
        error(f"connect: {e}")
        return
    try:
        work(conn)
    except Exception as e:  # noqa: BLE001
        if not stop.is_set():
            error(f"{type(e).__name__}: {e}")
    finally:
        with contextlib.suppress(Exception):
            conn.close()


class TxnLoad:
    """MariaDB's load: client threads moving money between accounts, one transaction each move
    (an UPDATE of the balance and an INSERT into the history); each transaction's span recorded."""

    def __init__(self, connect: Callable[[], Any], writers: int):
        self.connect = connect
        self.spans: list[tuple[int, int]] = []
        self.errors: list[str] = []
        self.stop = threading.Event()
        self.threads = [threading.Thread(target=self._run, args=(i,), name=f"demo-load{i}", daemon=True)
                        for i in range(writers)]
        self.t0 = self.t1 = 0

    def _run(self, wid: int) -> None:
        rng = random.Random(wid)

        def work(conn: Any) -> None:
            while not self.stop.is_set():
                acct, delta = rng.randint(1, MARIADB_ACCOUNTS), rng.randint(-5000, 5000)
                t0 = time.monotonic_ns()
                with conn.cursor() as cur:
                    cur.execute("UPDATE acct SET bal = bal + %s WHERE id = %s", (delta, acct))
                    cur.execute("INSERT INTO hist (acct, delta) VALUES (%s, %s)", (acct, delta))
                conn.commit()
                self.spans.append((t0, time.monotonic_ns()))

        client_session(self.connect, self.stop, work, self.errors.append)

    def start(self) -> None:
        """Start the writers."""
        self.t0 = time.monotonic_ns()
        for t in self.threads:
            t.start()

    def finish(self) -> dict[str, object]:
        """Stop the writers; what they did, for the report."""
        self.stop.set()
        for t in self.threads:
            t.join(30)
        self.t1 = time.monotonic_ns()
        secs = max(1e-9, (self.t1 - self.t0) / 1e9)
        return {"kind": f"{len(self.threads)} PyMySQL clients, UPDATE + INSERT per transaction",
                "transactions": len(self.spans), "tps": round(len(self.spans) / secs),
                "errors": self.errors}


class PgBench:
    """pgbench in the background: -c clients, -P 1 progress relayed, every transaction logged (-l)."""

    def __init__(self, server: PostgresServer, prefix: str, out: str):
        self.prefix = prefix
        self.out_path = out
        assert server.sockdir is not None
        argv = [server.bin["pgbench"], "-h", server.sockdir, "-p", str(server.port), "-U", "postgres",
                "-n",  # no vacuum, and above all no TRUNCATE of pgbench_history: the invariant spans rounds
                "-c", str(PGBENCH_CLIENTS), "-j", "2", "-T", str(PGBENCH_SECONDS), "-P", "1",
                "-l", f"--log-prefix={prefix}", "bench"]
        env = {"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": server.password}
        self.out = open(out, "w")
        self.epoch_offset_ns = time.time_ns() - time.monotonic_ns()  # pgbench logs epoch times
        self.proc = subprocess.Popen(argv, stdout=self.out, stderr=subprocess.PIPE, text=True, env=env,
                                     cwd=os.path.dirname(prefix), start_new_session=True)
        self.relay = threading.Thread(target=self._relay, name="demo-pgbench", daemon=True)
        self.relay.start()
        self.stderr: list[str] = []

    def _relay(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            line = line.rstrip()
            if line.startswith("progress:"):
                say("  pgbench " + line)
            elif line:
                self.stderr.append(line)

    def finish(self, timeout: float) -> dict[str, object]:
        """Wait up to timeout s for pgbench to end (then kill it); its summary, for the report."""
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
        self.relay.join(5)
        self.out.close()
        text = open(self.out_path).read()
        tps = next((ln.split("=")[1].split()[0] for ln in text.splitlines() if ln.startswith("tps =")), None)
        done = next((ln.split(":")[1].strip() for ln in text.splitlines()
                     if "number of transactions actually processed" in ln), None)
        return {"kind": f"pgbench -c {PGBENCH_CLIENTS} -T {PGBENCH_SECONDS} (scale {PGBENCH_SCALE})",
                "exit_code": self.proc.returncode, "tps": round(float(tps)) if tps else None,
                "transactions": int(done.split("/")[0]) if done else None, "errors": self.stderr[-5:]}

    def spans(self) -> list[tuple[int, int]]:
        """Each logged transaction as monotonic (start, end) ns: the log gives its end (epoch) and latency."""
        out = []
        for path in glob.glob(self.prefix + ".*"):
            with open(path) as f:
                for ln in f:
                    p = ln.split()
                    if len(p) >= 6 and all(x.isdigit() for x in p[:6]):
                        end = (int(p[4]) * 1_000_000 + int(p[5])) * 1000 - self.epoch_offset_ns
                        out.append((end - int(float(p[2])) * 1000, end))
        return out

    def kill(self) -> None:
        """Kill pgbench if it runs."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
