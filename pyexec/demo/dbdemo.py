"""`pyexec demo --db postgresql|mariadb`: a database server under load, snapshotted with pyexec's
built-in quiescer, restored on a second server and verified.

Sandbox (as the SQLite demo's): an outer btrfs loop image (the storage layer) holding two disk
images, loop-mounted: the data directory on ext4, the log on xfs (PostgreSQL's pg_wal; MariaDB's
binlog and InnoDB redo log), as DBAs lay them out.  The server's socket and log live in /run
(servers.py).  Each round drives a load (pgbench; or PyMySQL transactions) and a *ledger* writer
(sequentially numbered rows, autocommit, each row's send and acknowledgement times recorded outside
the frozen disks), runs pyexec (quiesce, freeze both disks, reflink both images, thaw, release),
then attaches the reflinked images on new loop devices, starts a second server on them (crash
recovery) and checks what the round's mode promises (PROMISES).  A quiesced PostgreSQL round is
restored a second time from the same snapshot by the other way: the backup_label the quiescer wrote,
WAL from the server's archive (in the sandbox, on neither disk), archive recovery to the backup's
consistency point: the restore a snapshot whose pieces are not one atomic image needs.

Nothing is left behind: every server is stopped, every mount and loop device removed, on success,
error, Ctrl-C and SIGTERM alike (--keep leaves the sandbox's files and mounts, never a server)."""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import glob
import os
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

import orjson

from pyexec import host, report
from pyexec.demo import loopfs, servers
from pyexec.demo.run import REPORT, _say, _write, _write_report, reflink
from pyexec.errors import PyexecError
from pyexec.quiesce import load_driver
from pyexec.window import Window

ENGINES = ("postgresql", "mariadb")
WARMUP_S = 1.5  # load before the snapshot
AFTER_S = 1.0  # load after the release: rows the snapshot must not have
ARCHIVE_WAIT_S = 30.0  # for the segment holding the backup's stop LSN to be archived
PGBENCH_SCALE = 1  # 100 000 accounts, ~15 MB
PGBENCH_CLIENTS = 4
PGBENCH_SECONDS = 5  # covers warm-up, the run (pre, window, post) and AFTER_S
MARIADB_WRITERS = 3
MARIADB_ACCOUNTS = 1000
PG_BACKUP_USER = "pyexec_backup"
MARIADB_BACKUP_USER = "pyexec_backup"
# FLUSH TABLES WITH READ LOCK and FLUSH ENGINE LOGS need RELOAD; SHOW MASTER STATUS needs BINLOG MONITOR
# (MariaDB 10.5+; SUPER before); PROCESS lets the quiescer name the statements its lock waited for.
# Not CONNECTION ADMIN: the quiescer's watchdog KILLs only its own session, which needs no privilege.
MARIADB_BACKUP_PRIVS = "RELOAD, PROCESS, BINLOG MONITOR"

PROMISES = {
    "postgresql": (
        "PostgreSQL keeps committing until the freeze: the quiescer's CHECKPOINT (and, two filesystems "
        "being frozen, a non-exclusive backup) only shortens the WAL a restore replays. The consistency "
        "point is the freeze itself (of the pg_wal disk: a commit is durable once its WAL is): every ledger "
        "row acknowledged before that freeze began is in the restored copy, none sent after it was frozen "
        "is, the ledger is gapless, pg_amcheck is clean, pgbench's "
        "balances equal its history, and recovery starts at the backup's checkpoint. The backup_label the "
        "quiescer wrote (START WAL LOCATION = the pre facts' backup_start_lsn) is for snapshots that are "
        "not atomic; this one (both disks inside one freeze window) restores by crash recovery. It is "
        "restored a second time with that label: pg_wal emptied, the WAL from the server's archive, "
        "archive recovery to the backup's consistency point (recovery_target 'immediate') and promote: "
        "consistent exactly at the backup's stop LSN, redo from its start LSN, pg_amcheck clean, balances "
        "equal the history, every ledger row acknowledged before the release began is present (the stop "
        "comes after the thaw, so rows committed between the thaw and the stop are too), gapless, and none "
        "sent after the release ended."),
    "mariadb": (
        "MariaDB is quiesced by FLUSH TABLES WITH READ LOCK: the quiesce point is when it returned (the "
        "pre-phase's end), writes block until UNLOCK TABLES (the post-phase). The restored ledger is exactly "
        "the rows acknowledged before the lock (none committed while it was held, none acknowledged after "
        "the release), every table passes CHECK TABLE, balances equal the history, and the restored "
        "server's @@gtid_binlog_pos equals the GTID the quiescer recorded."),
    "unquiesced": (
        "Nothing quiesced (no plugin): file-system-consistent, which a database restores as after a crash. "
        "Promised and checked: the server recovers and starts, its integrity checks pass, the ledger is gapless, "
        "every row acknowledged before the log disk's freeze began is present and none sent after it was frozen; "
        "the row in flight at that instant may be either way."),
}


def _kib(n: int | None) -> str:
    if n is None:
        return "none"
    return f"{n} B" if n < 1024 else f"{n / 1024:.1f} KiB" if n < 1 << 20 else f"{n / (1 << 20):.2f} MiB"


# ------------------------------------------------------------------------------------- the writers


def _startup_doc(startup: servers.Startup) -> dict[str, Any]:
    """A restored server's Startup as report fields: its first 20 recovery log lines, not all."""
    doc = {k: v for k, v in dataclasses.asdict(startup).items() if k != "log"}
    doc["log"] = startup.log[:20]
    return doc

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
        try:
            conn = self.connect()
        except Exception as e:  # noqa: BLE001 - reported, and the round fails on it
            self.error = f"connect: {e}"
            return
        try:
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
        except Exception as e:  # noqa: BLE001
            if not self.stop.is_set():
                self.error = f"{type(e).__name__}: {e}"
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def start(self) -> None:
        self.thread.start()

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)


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
        import random
        rng = random.Random(wid)
        try:
            conn = self.connect()
        except Exception as e:  # noqa: BLE001
            self.errors.append(f"connect: {e}")
            return
        try:
            while not self.stop.is_set():
                acct, delta = rng.randint(1, MARIADB_ACCOUNTS), rng.randint(-5000, 5000)
                t0 = time.monotonic_ns()
                with conn.cursor() as cur:
                    cur.execute("UPDATE acct SET bal = bal + %s WHERE id = %s", (delta, acct))
                    cur.execute("INSERT INTO hist (acct, delta) VALUES (%s, %s)", (acct, delta))
                conn.commit()
                self.spans.append((t0, time.monotonic_ns()))
        except Exception as e:  # noqa: BLE001
            if not self.stop.is_set():
                self.errors.append(f"{type(e).__name__}: {e}")
        finally:
            with contextlib.suppress(Exception):
                conn.close()

    def start(self) -> None:
        self.t0 = time.monotonic_ns()
        for t in self.threads:
            t.start()

    def finish(self) -> dict[str, object]:
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

    def __init__(self, server: servers.PostgresServer, prefix: str, out: str):
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
                _say("  pgbench " + line)
            elif line:
                self.stderr.append(line)

    def finish(self, timeout: float) -> dict[str, object]:
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
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------- the site

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


class Site:
    """The sandbox, the server and its quiescer configuration, and the rounds' restores."""

    def __init__(self, engine: str, base: str | None, keep: bool):
        self.engine, self.keep = engine, keep
        self.dir = tempfile.mkdtemp(prefix=f"pyexec-demo-{engine}-", dir=base)
        os.chmod(self.dir, 0o711)  # the servers run as postgres / mysql and must reach their directories
        self.fs: list[loopfs.LoopFS] = []
        self.restore_fs: list[loopfs.LoopFS] = []
        self.server: servers.PostgresServer | servers.MariaDBServer | None = None
        self.restored: servers.PostgresServer | servers.MariaDBServer | None = None
        self.workers: list[Ledger | TxnLoad | PgBench] = []
        self.run_dirs: list[str] = []  # every server's run directory in /run (all gone after close())
        self.driver: ModuleType = load_driver(engine, "")

    # ---- setup
    def build(self) -> None:
        _say(f"sandbox in {self.dir}: outer btrfs image (the storage layer)")
        self.outer = self._mount("outer.img", "outer", "btrfs", 1024)
        log = "pg_wal" if self.engine == "postgresql" else "binlog + InnoDB redo log"
        _say(f"two disks inside it: ext4 for the data directory, xfs for the {log}")
        self.data = self._mount(os.path.join("outer", "disk-data.img"), "data", "ext4", 256)
        self.wal = self._mount(os.path.join("outer", "disk-wal.img"), "wal", "xfs", 320)
        for d in ("etc", "state", "labels"):
            os.mkdir(os.path.join(self.dir, d), 0o700)

    def _mount(self, image: str, mnt: str, fstype: str, size_mb: int) -> loopfs.LoopFS:
        m = loopfs.LoopFS(os.path.join(self.dir, image), os.path.join(self.dir, mnt), fstype, size_mb)
        self.fs.append(m)
        return m

    def start_server(self) -> None:
        if self.engine == "postgresql":
            _say("starting PostgreSQL (initdb; socket and log in /run, WAL on the xfs disk)")
            # The WAL archive is on neither disk (in the sandbox, beside them): the label restore's WAL.
            pg = self.server = servers.PostgresServer(os.path.join(self.data.mountpoint, "pg"),
                                                      waldir=os.path.join(self.wal.mountpoint, "pg_wal"),
                                                      archive_dir=os.path.join(self.dir, "archive"))
            try:
                pg.start()
            finally:
                self.run_dirs += [pg.rundir] if pg.rundir else []
            pg.psql("CREATE DATABASE bench")
            _say(f"pgbench -i -s {PGBENCH_SCALE}; amcheck installed for the restore's pg_amcheck")
            assert pg.sockdir is not None
            res = subprocess.run([pg.bin["pgbench"], "-i", "-q", "-s", str(PGBENCH_SCALE), "-h", pg.sockdir,
                                  "-p", str(pg.port), "-U", "postgres", "bench"], capture_output=True, text=True,
                                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": pg.password},
                                 cwd="/", timeout=300, check=False)
            if res.returncode != 0:
                raise servers.ServerError(f"pgbench -i failed: {res.stderr.strip()}")
            pg.psql("CREATE EXTENSION amcheck; "
                    "CREATE TABLE ledger (round int, seq int, sent_ns bigint, PRIMARY KEY (round, seq))",
                    dbname="bench")
            pw = secrets.token_hex(12)
            # Least privilege: pg_checkpoint (PostgreSQL 15) for CHECKPOINT, and the two backup functions.
            pg.psql(f"CREATE ROLE {PG_BACKUP_USER} LOGIN PASSWORD '{pw}'; GRANT pg_checkpoint TO {PG_BACKUP_USER}; "
                    f"GRANT EXECUTE ON FUNCTION pg_backup_start(text, boolean) TO {PG_BACKUP_USER}; "
                    f"GRANT EXECUTE ON FUNCTION pg_backup_stop(boolean) TO {PG_BACKUP_USER};")
            db: dict[str, object] = {"host": pg.sockdir, "port": pg.port, "user": PG_BACKUP_USER,
                                     "database": "postgres",
                                     "backupLabelDirectory": os.path.join(self.dir, "labels")}
        else:
            _say("starting MariaDB (socket and log in /run, binlog + InnoDB redo log on the xfs disk)")
            my = self.server = servers.MariaDBServer(os.path.join(self.data.mountpoint, "db"),
                                                     logdir=os.path.join(self.wal.mountpoint, "log"))
            try:
                my.start()
            finally:
                self.run_dirs += [my.rundir] if my.rundir else []
            my.sql("CREATE DATABASE demo; USE demo; "
                   "CREATE TABLE acct (id INT PRIMARY KEY, bal BIGINT NOT NULL) ENGINE=InnoDB; "
                   f"INSERT INTO acct SELECT seq, 0 FROM seq_1_to_{MARIADB_ACCOUNTS}; "
                   "CREATE TABLE hist (id BIGINT AUTO_INCREMENT PRIMARY KEY, acct INT NOT NULL, "
                   "delta INT NOT NULL) ENGINE=InnoDB; "
                   "CREATE TABLE ledger (round INT, seq INT, sent_ns BIGINT, PRIMARY KEY (round, seq)) ENGINE=InnoDB")
            pw = secrets.token_hex(12)
            my.create_user(MARIADB_BACKUP_USER, pw, MARIADB_BACKUP_PRIVS)
            _say(f"quiescer user {MARIADB_BACKUP_USER}@localhost: {MARIADB_BACKUP_PRIVS}")
            db = {"host": my.socket_path, "user": MARIADB_BACKUP_USER, "lockWaitTimeoutInSeconds": 10}
        etc = os.path.join(self.dir, "etc")
        db |= {"credentialsFile": _write(os.path.join(etc, "credentials"), pw + "\n", 0o600),
               "timeoutInSeconds": 20}
        pj = _write(os.path.join(etc, f"{self.engine}.json"), orjson.dumps(db, option=orjson.OPT_INDENT_2).decode(),
                    0o600)
        self.host_conf = {
            True: _write(os.path.join(etc, "VMSnapshotPluginHost.conf"),
                         f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\npluginName0 = {self.engine}\n"
                         f"pluginPath0 = builtin\npluginConfigPath0 = {pj}\n", 0o600),
            # Unquiesced: no plugin at all, so the run itself says what the snapshot is.
            False: _write(os.path.join(etc, "VMSnapshotPluginHost-none.conf"),
                          "[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 0\n", 0o600)}

    def connect(self) -> Any:
        """A client session of the original server (autocommit)."""
        if isinstance(self.server, servers.PostgresServer):
            return self.driver.connect(**self.server.connect_args(dbname="bench"), autocommit=True)
        assert self.server is not None
        return self.driver.connect(**self.server.connect_args(database="demo"), autocommit=True)

    def connect_txn(self) -> Any:
        assert isinstance(self.server, servers.MariaDBServer)
        return self.driver.connect(**self.server.connect_args(database="demo"), autocommit=False)

    # ---- one round
    def round(self, rnd: int, quiesce: bool) -> dict[str, Any]:
        mode = "quiesced" if quiesce else "unquiesced"
        state = os.path.join(self.dir, "state")
        snaps = {"data": os.path.join(self.outer.mountpoint, f"snap{rnd}-data.img"),
                 "wal": os.path.join(self.outer.mountpoint, f"snap{rnd}-wal.img")}
        load: PgBench | TxnLoad
        if isinstance(self.server, servers.PostgresServer):
            _say(f"round {rnd} ({mode}): pgbench -c {PGBENCH_CLIENTS} -P 1 in the background + the ledger writer")
            load = PgBench(self.server, os.path.join(state, f"pgbench-r{rnd}"),
                           os.path.join(state, f"pgbench-summary-r{rnd}.txt"))
        else:
            _say(f"round {rnd} ({mode}): {MARIADB_WRITERS} PyMySQL transaction writers + the ledger writer")
            load = TxnLoad(self.connect_txn, MARIADB_WRITERS)
            load.start()
        self.workers.append(load)
        ledger = Ledger(self.connect, rnd, os.path.join(state, f"ledger-r{rnd}.tsv"))
        self.workers.append(ledger)
        ledger.start()
        time.sleep(WARMUP_S)

        stamps = Stamps()

        def progress(msg: str) -> None:
            now = time.monotonic_ns()
            if msg.startswith("pre-scripts"):
                stamps.pre_start = now
            elif msg.startswith(("freeze", "snapshot without")):
                stamps.pre_end = now
            elif msg.startswith("post-scripts"):
                stamps.post_start = now
            _say("  " + msg)

        def take(window: Window | None) -> None:
            reflink(self.data.image, snaps["data"])
            reflink(self.wal.image, snaps["wal"])

        what = ("pre (quiesce: " + ("CHECKPOINT + pg_backup_start" if self.engine == "postgresql"
                                     else "FLUSH TABLES WITH READ LOCK") + ")") if quiesce else "no plugin"
        _say(f"round {rnd}: {what} → freeze ext4+xfs → reflink both images → thaw"
             + (" → post (release)" if quiesce else ""))
        rep = host.run(self.host_conf[quiesce], mount_points=[self.data.mountpoint, self.wal.mountpoint],
                       snapshot=take, freeze_timeout=30, progress=progress)
        stamps.released = time.monotonic_ns()
        if rep.interrupted:
            raise KeyboardInterrupt
        label_restore = quiesce and self.engine == "postgresql" and rep.snapshot == "taken"
        if label_restore:
            # The same snapshot for the second restore (the first one's recovery writes to its copies).
            for k in ("data", "wal"):
                snaps[f"{k}-label"] = snaps[k].replace(".img", "-label.img")
                reflink(snaps[k], snaps[f"{k}-label"])
        if rep.window is not None:
            stamps.freeze_start, stamps.thaw_end = rep.window.start_ns, rep.window.end_ns
            for m in rep.window.mounts:
                if os.path.realpath(m.path) == os.path.realpath(self.wal.mountpoint):
                    stamps.log_freeze_start, stamps.log_freeze_end = m.freeze_start_ns, m.freeze_end_ns
        if isinstance(load, PgBench):
            load_doc = load.finish(PGBENCH_SECONDS + 30)
            if load.proc.returncode == 0 and time.monotonic_ns() < stamps.thaw_end + int(AFTER_S * 1e9):
                time.sleep(AFTER_S)
            spans = load.spans()
        else:
            time.sleep(AFTER_S)
            load_doc = load.finish()
            spans = load.spans
        ledger.finish()
        w0, w1 = stamps.freeze_start, stamps.thaw_end
        load_doc["in_flight_across_window"] = sum(1 for s, e in spans if s < w1 and e > w0) if w0 else None
        doc: dict[str, Any] = {"round": rnd, "mode": mode, "report": report.to_dict(rep), "load": load_doc,
                               "stamps_ns": dataclasses.asdict(stamps)}
        expected = host.APP if quiesce else host.FS
        checks: dict[str, bool] = {f"outcome is {expected}": rep.outcome == expected,
                                   "load ran without errors": not load_doc["errors"] and ledger.error is None}
        if ledger.error:
            doc["ledger_error"] = ledger.error
        if rep.snapshot == "taken" and w0 and stamps.log_freeze_end:
            _say(f"round {rnd}: restoring: the reflinked images on new loop devices, a second server, "
                 "crash recovery, then the checks")
            restore, rchecks = self.restore(rnd, snaps, rep, ledger, stamps, quiesce)
            doc["restore"] = restore
            checks |= rchecks
            if label_restore and rep.post and rep.post[0].facts.get("backup_stop_lsn"):
                _say(f"round {rnd}: restoring again, with the backup_label: pg_wal emptied, WAL from the "
                     "archive, archive recovery to the backup's consistency point")
                lrest, lchecks = self.label_restore(rnd, snaps, rep, ledger, stamps)
                doc["label_restore"] = lrest
                doc["label_restore"]["verified"] = all(lchecks.values())
                checks |= {f"label restore: {k}": v for k, v in lchecks.items()}
            elif label_restore:
                checks["label restore: the release wrote a backup_label"] = False
        else:
            checks["snapshot taken"] = False
        doc["checks"] = checks
        doc["verified"] = all(checks.values())
        doc["promise"] = PROMISES[self.engine if quiesce else "unquiesced"]
        for img in snaps.values():
            if not self.keep:
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(img)
        return doc

    # ---- the restore
    @contextlib.contextmanager
    def _restored_disks(self, name: str, data_img: str, wal_img: str) -> Iterator[tuple[loopfs.LoopFS, loopfs.LoopFS]]:
        """The snapshot's two images on new loop devices under a directory `name` of the sandbox; afterwards
        the restored server is stopped and the disks detached (their images kept with --keep)."""
        rdir = os.path.join(self.dir, name)
        os.mkdir(rdir, 0o711)
        data = loopfs.LoopFS(data_img, os.path.join(rdir, "data"), "ext4", create=False)
        self.restore_fs.append(data)
        # The copy has its original's xfs UUID, and the original is mounted: nouuid (xfs(5)).
        wal = loopfs.LoopFS(wal_img, os.path.join(rdir, "wal"), "xfs", create=False, options="nouuid")
        self.restore_fs.append(wal)
        try:
            yield data, wal
        finally:
            if self.restored is not None:
                self.restored.stop()
                self.restored = None
            for m in (wal, data):
                m.close(remove_image=not self.keep)
                self.restore_fs.remove(m)
            with contextlib.suppress(OSError):
                os.rmdir(rdir)

    def restore(self, rnd: int, snaps: dict[str, str], rep: host.RunReport, ledger: Ledger, st: Stamps,
                quiesce: bool) -> tuple[dict[str, Any], dict[str, bool]]:
        out: dict[str, Any] = {}
        checks: dict[str, bool] = {}
        with self._restored_disks(f"restore{rnd}", snaps["data"], snaps["wal"]) as (data, wal):
            assert self.server is not None
            if isinstance(self.server, servers.PostgresServer):
                r: servers.PostgresServer | servers.MariaDBServer = servers.PostgresServer(
                    os.path.join(data.mountpoint, "pg"), waldir=os.path.join(wal.mountpoint, "pg_wal"),
                    password=self.server.password)
            else:
                r = servers.MariaDBServer(os.path.join(data.mountpoint, "db"), logdir=os.path.join(wal.mountpoint, "log"),
                                          password=self.server.password, server_id=2)
            self.restored = r
            try:
                startup = r.start(existing=True)
                self.run_dirs += [r.rundir] if r.rundir else []
            except servers.ServerError as e:
                out["start_error"] = str(e)
                checks["restored server starts"] = False
                return out, checks
            checks["restored server starts"] = True
            out["startup"] = _startup_doc(startup)
            if isinstance(r, servers.PostgresServer):
                self._check_pg(r, rep, quiesce, startup, out, checks)
                present = {int(x) for x in r.psql(f"SELECT seq FROM ledger WHERE round = {rnd}", dbname="bench").split()}
            else:
                self._check_mariadb(r, rep, quiesce, out, checks)
                present = {int(x) for x in r.sql(f"SELECT seq FROM ledger WHERE round = {rnd}", database="demo").split()}
            self._check_ledger(ledger, present, st, quiesce, out, checks)
        return out, checks

    def label_restore(self, rnd: int, snaps: dict[str, str], rep: host.RunReport, ledger: Ledger,
                      st: Stamps) -> tuple[dict[str, Any], dict[str, bool]]:
        """The round's snapshot restored by archive recovery from the quiescer's backup_label."""
        assert isinstance(self.server, servers.PostgresServer)
        pre, post = rep.pre[0].facts, rep.post[0].facts
        stop, label = post["backup_stop_lsn"], post.get("backup_label", "")
        out: dict[str, Any] = {"backup_label": label, "backup_stop_lsn": stop}
        checks: dict[str, bool] = {}
        try:
            out["archived_to"] = self.server.wait_archived(stop, ARCHIVE_WAIT_S)
        except servers.ServerError as e:
            out["start_error"] = str(e)
            checks["the WAL up to the stop LSN is archived"] = False
            return out, checks
        with self._restored_disks(f"restore{rnd}-label", snaps["data-label"], snaps["wal-label"]) as (data, wal):
            r = servers.PostgresServer(os.path.join(data.mountpoint, "pg"), waldir=os.path.join(wal.mountpoint, "pg_wal"),
                                       password=self.server.password)
            self.restored = r
            try:
                startup = r.start_archive_recovery(label, os.path.join(self.dir, "archive"))
                self.run_dirs += [r.rundir] if r.rundir else []
            except (servers.ServerError, OSError) as e:
                out["start_error"] = str(e)
                checks["restored server starts by archive recovery and is promoted"] = False
                return out, checks
            out["startup"] = _startup_doc(startup)
            checks["restored server starts by archive recovery and is promoted"] = (
                startup.archive_recovery and startup.promoted)
            checks["consistent exactly at the backup's stop LSN"] = startup.consistent_at == stop
            checks["redo starts at the backup's start LSN (the label's checkpoint)"] = (
                startup.redo_start == pre.get("backup_start_lsn"))
            self._check_pg(r, rep, False, startup, out, checks)
            present = {int(x) for x in r.psql(f"SELECT seq FROM ledger WHERE round = {rnd}", dbname="bench").split()}
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
        return out, checks

    def _check_pg(self, r: servers.PostgresServer, rep: host.RunReport, quiesce: bool, startup: servers.Startup,
                  out: dict[str, Any], checks: dict[str, bool]) -> None:
        assert r.sockdir is not None
        am = subprocess.run([r.bin["pg_amcheck"], "-h", r.sockdir, "-p", str(r.port), "-U", "postgres",
                             "-d", "bench", "--heapallindexed"], capture_output=True, text=True, cwd="/",
                            env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": r.password}, timeout=300,
                            check=False)
        out["pg_amcheck"] = {"exit_code": am.returncode, "output": (am.stdout + am.stderr).strip()[-2000:]}
        checks["pg_amcheck clean"] = am.returncode == 0 and not am.stdout.strip()
        sums = r.psql("SELECT (SELECT sum(abalance) FROM pgbench_accounts), (SELECT sum(tbalance) FROM pgbench_tellers), "
                      "(SELECT sum(bbalance) FROM pgbench_branches), (SELECT coalesce(sum(delta), 0) FROM pgbench_history), "
                      "(SELECT count(*) FROM pgbench_history)", dbname="bench").split("|")
        acc, tel, br, hist, n = (int(x) for x in sums)
        out["pgbench"] = {"sum_abalance": acc, "sum_tbalance": tel, "sum_bbalance": br, "sum_delta": hist,
                          "history_rows": n}
        checks["pgbench balances = history (accounts, tellers, branches)"] = acc == tel == br == hist
        if quiesce and rep.pre and rep.post:
            pre, post = rep.pre[0].facts, rep.post[0].facts
            label = post.get("backup_label", "")
            out["backup_label"] = label
            try:
                text = open(label).read()
                start = next(ln.split()[3] for ln in text.splitlines() if ln.startswith("START WAL LOCATION:"))
            except (OSError, StopIteration, IndexError):
                start = None
            out["backup_label_start_wal_location"] = start
            checks["backup_label START WAL LOCATION = backup_start_lsn"] = (
                start is not None and start == pre.get("backup_start_lsn"))
            b = pre.get("backup_start_lsn")
            checks["recovery starts at or after the quiesce's checkpoint"] = bool(
                b and startup.redo_start and servers._lsn(startup.redo_start) >= servers._lsn(b))

    def _check_mariadb(self, r: servers.MariaDBServer, rep: host.RunReport, quiesce: bool, out: dict[str, Any],
                       checks: dict[str, bool]) -> None:
        tables = r.sql("SELECT CONCAT('`', TABLE_SCHEMA, '`.`', TABLE_NAME, '`') FROM information_schema.TABLES "
                       "WHERE TABLE_TYPE = 'BASE TABLE' AND TABLE_SCHEMA NOT IN "
                       "('information_schema', 'performance_schema', 'sys')").split()
        rows = [ln.split("\t") for ln in r.sql("CHECK TABLE " + ", ".join(tables)).splitlines()]
        status = {t: m for t, op, kind, m in rows if kind == "status"}
        bad = {t: m for t, m in status.items() if m != "OK"}
        out["check_table"] = {"tables": len(tables), "ok": sum(m == "OK" for m in status.values()), "not_ok": bad}
        checks["CHECK TABLE OK for every table"] = len(status) == len(tables) and not bad
        bal, delta, n = (int(x) for x in r.sql("SELECT (SELECT sum(bal) FROM acct), "
                                               "(SELECT coalesce(sum(delta), 0) FROM hist), (SELECT count(*) FROM hist)",
                                               database="demo").split())
        out["balances"] = {"sum_bal": bal, "sum_delta": delta, "history_rows": n}
        checks["balances = history"] = bal == delta
        gtid = r.sql("SELECT @@GLOBAL.gtid_binlog_pos")
        out["gtid_binlog_pos"] = gtid
        if quiesce and rep.pre:
            out["gtid_at_quiesce"] = rep.pre[0].facts.get("gtid")
            checks["restored @@gtid_binlog_pos = the GTID recorded at the quiesce"] = gtid == out["gtid_at_quiesce"]

    def _check_ledger(self, ledger: Ledger, present: set[int], st: Stamps, quiesce: bool, out: dict[str, Any],
                      checks: dict[str, bool]) -> None:
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
        if quiesce and self.engine == "mariadb":
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

    # ---- teardown
    def close(self) -> None:
        """Stop everything started, thaw, unmount, detach, remove (servers are stopped even with --keep)."""
        for w in self.workers:
            if isinstance(w, PgBench):
                w.kill()
            else:
                w.stop.set()
        for m in self.fs + self.restore_fs:  # a frozen disk would hang everything below: thaw first
            m.thaw()
        for srv in (self.restored, self.server):
            if srv is not None:
                with contextlib.suppress(Exception):
                    srv.stop()
        self.restored = self.server = None
        for w in self.workers:
            for t in ([w.thread] if isinstance(w, Ledger) else w.threads if isinstance(w, TxnLoad) else [w.relay]):
                if t.is_alive():
                    t.join(10)
        for m in reversed(self.restore_fs):
            m.close(remove_image=not self.keep)
        if self.keep:
            _say(f"--keep: sandbox left in {self.dir} (mounted; servers stopped); remove with umount + losetup -d")
            return
        for m in reversed(self.fs):
            m.close()
        shutil.rmtree(self.dir, ignore_errors=True)


# ------------------------------------------------------------------------------------- the output

def _round_summary(d: dict[str, Any], engine: str) -> str:
    rep = d["report"]
    lines = [f"round {d['round']} ({d['mode']}): outcome {rep['outcome']}"
             + (f", freeze window {rep['window']['length_ns'] / 1e6:.1f} ms" if rep.get("window") else "")]
    for ph in ("pre", "post"):
        for s in rep.get(ph) or []:
            facts = ", ".join(f"{k}={v}" for k, v in s.get("facts", {}).items())
            lines.append(f"  {ph} {s['plugin']}: {'ok' if s['error_code'] == 0 else 'error ' + str(s['error_code'])}"
                         f" in {s['duration_ns'] / 1e6:.1f} ms" + (f"; {facts}" if facts else ""))
    ld = d["load"]
    lines.append(f"  load: {ld['kind']}: {ld['transactions']} transactions, {ld['tps']} tps; "
                 f"{ld['in_flight_across_window']} open across the window (client view)")
    rs = d.get("restore", {})
    if "startup" in rs:
        s = rs["startup"]
        lines.append(f"  restore: server started in {s['seconds']:.2f} s, crash recovery "
                     f"{'replayed ' + _kib(s['redo_bytes']) if s['recovered'] else 'not needed'}"
                     + (f" ({s['redo_start']} → {s['redo_end']})" if s.get("redo_start") else ""))
    if "ledger" in rs:
        lg = rs["ledger"]
        lines.append(f"  ledger: {lg['rows_written']} rows written, {lg['rows_restored']} restored; "
                     f"{lg['acked_before_log_freeze']} acked before the log disk's freeze "
                     f"({lg['missing_acked_before_log_freeze']} missing), {lg['present_sent_after_log_frozen']} of "
                     f"{lg['sent_after_log_frozen']} sent after it froze present, "
                     f"{lg['in_flight']} in flight at it ({lg['in_flight_present']} present)")
        if "committed_while_locked" in lg:
            waited = ", ".join(f"#{w['seq']} waited {w['waited_ms']} ms" for w in lg["waited_for_the_lock"]) or "none"
            lines.append(f"  read lock held {lg['lock_held_ms']} ms: {lg['committed_while_locked']} rows committed "
                         f"under it; restored = the {lg['acked_before_release']} rows acked before it; "
                         f"waited for the lock: {waited}")
    if "pg_amcheck" in rs:
        p = rs["pgbench"]
        lines.append(f"  pg_amcheck exit {rs['pg_amcheck']['exit_code']}; pgbench sums: accounts {p['sum_abalance']}, "
                     f"tellers {p['sum_tbalance']}, branches {p['sum_bbalance']}, history {p['sum_delta']}")
    if "backup_label" in rs:
        lines.append(f"  backup_label (for a non-atomic snapshot; not used by the crash-recovery restore): "
                     f"{rs['backup_label']}, START WAL LOCATION {rs['backup_label_start_wal_location']}")
    lr = d.get("label_restore")
    if lr is not None:
        if "startup" in lr and "ledger" in lr:
            s, lg = lr["startup"], lr["ledger"]
            lines.append(f"  label restore: consistent at LSN {s['consistent_at']} (the stop LSN {lr['backup_stop_lsn']}), "
                         f"started in {s['seconds']:.2f} s, {s['restored_files']} WAL files from the archive, "
                         f"rows {lg['rows_restored']} ({lg['acked_before_freeze']} acked before the freeze, "
                         f"{lg['acked_before_release']} before the release): "
                         + ("VERIFIED" if lr["verified"] else "FAILED"))
        else:
            lines.append(f"  label restore FAILED: {lr.get('start_error', '?').splitlines()[0]}")
    if "check_table" in rs:
        c = rs["check_table"]
        lines.append(f"  CHECK TABLE: {c['ok']}/{c['tables']} OK; balances {rs['balances']['sum_bal']} = "
                     f"history {rs['balances']['sum_delta']}; restored gtid_binlog_pos {rs['gtid_binlog_pos']}"
                     + (f" (at the quiesce: {rs['gtid_at_quiesce']})" if "gtid_at_quiesce" in rs else ""))
    if "start_error" in rs:
        lines.append(f"  restore FAILED: {rs['start_error'].splitlines()[0]}")
    failed = [k for k, ok in d["checks"].items() if not ok]
    kind = "application-consistent" if d["mode"] == "quiesced" else "crash-consistent (file-system-consistent)"
    lines.append(f"  → {kind} checks: {len(d['checks']) - len(failed)}/{len(d['checks'])} passed"
                 + (": VERIFIED" if d["verified"] else "; FAILED: " + "; ".join(failed)))
    return "\n".join(lines)


def _compare(rounds: list[dict[str, Any]]) -> dict[str, Any] | None:
    q = next((r for r in rounds if r["mode"] == "quiesced"), None)
    u = next((r for r in rounds if r["mode"] == "unquiesced"), None)
    if q is None or u is None:
        return None

    def col(r: dict[str, Any]) -> dict[str, Any]:
        s = r.get("restore", {}).get("startup", {})
        lg = r.get("restore", {}).get("ledger", {})
        return {"outcome": r["report"]["outcome"], "redo_bytes": s.get("redo_bytes"),
                "redo_range": f"{s.get('redo_start')} → {s.get('redo_end')}" if s.get("redo_start") else "-",
                "recovery_seconds": s.get("seconds"), "redo_seconds": s.get("redo_seconds"),
                "ledger_in_flight": lg.get("in_flight"), "ledger_in_flight_present": lg.get("in_flight_present"),
                "load_in_flight": r["load"].get("in_flight_across_window"),
                "window_ms": r["report"]["window"]["length_ns"] / 1e6 if r["report"].get("window") else None,
                "verified": r["verified"]}
    return {"quiesced": col(q), "unquiesced": col(u)}


def _compare_table(c: dict[str, Any]) -> str:
    q, u = c["quiesced"], c["unquiesced"]

    def secs(x: float | None) -> str:
        return "-" if x is None else f"{x:.2f} s"

    rows = [("outcome", q["outcome"], u["outcome"]),
            ("WAL/redo replayed at restore", _kib(q["redo_bytes"]), _kib(u["redo_bytes"])),
            ("  from → to", q["redo_range"], u["redo_range"]),
            ("redo time (the engine's figure)", secs(q["redo_seconds"]), secs(u["redo_seconds"])),
            ("restore: start incl. recovery", secs(q["recovery_seconds"]), secs(u["recovery_seconds"])),
            ("ledger rows in flight (present)", f"{q['ledger_in_flight']} ({q['ledger_in_flight_present']})",
             f"{u['ledger_in_flight']} ({u['ledger_in_flight_present']})"),
            ("load transactions across window", str(q["load_in_flight"]), str(u["load_in_flight"])),
            ("freeze window", f"{q['window_ms']:.1f} ms" if q["window_ms"] else "-",
             f"{u['window_ms']:.1f} ms" if u["window_ms"] else "-"),
            ("verified (what the mode promises)", str(q["verified"]), str(u["verified"]))]
    w = max(len(r[0]) for r in rows) + 2
    out = [f"{'':<{w}}{'quiesced':<26}unquiesced"]
    out += [f"{a:<{w}}{b:<26}{c2}" for a, b, c2 in rows]
    return "\n".join(out)


# ---------------------------------------------------------------------------------------- the run

def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """The database demo; exit 0 only when every round verifies what its mode promises (1: not verified
    or failed; 2: not root, or a server binary or driver is missing)."""
    engine: str = args.db
    out = sys.stderr if args.json else sys.stdout
    doc: dict[str, Any] = {"db": engine, "rounds": [], "ok": False}

    def emit() -> None:
        if args.json:
            sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
            sys.stdout.flush()

    if os.geteuid() != 0:
        print("pyexec demo: needs root (loop devices, mount, FIFREEZE, server users)", file=sys.stderr)
        doc["error"] = "needs root"
        emit()
        return 2
    try:
        (servers.PostgresServer if engine == "postgresql" else servers.MariaDBServer).find_binaries()
        load_driver(engine, "")
    except (servers.ServerError, PyexecError) as e:
        msg = str(e) if isinstance(e, servers.ServerError) else f"{e.describe()} (or run scripts/setup.sh)"
        print(f"pyexec demo: {msg}", file=sys.stderr)
        doc["error"] = msg
        emit()
        return 2
    modes = [True, False] * args.rounds if args.compare else [not args.no_quiesce] * args.rounds
    old_term = signal.signal(signal.SIGTERM, _raise_interrupt)
    site: Site | None = None
    where: list[str] = []
    try:
        site = Site(engine, args.dir, args.keep)
        site.build()
        site.start_server()
        for i, quiesce in enumerate(modes, 1):
            d = site.round(i, quiesce)
            doc["rounds"].append(d)
            print(_round_summary(d, engine), file=out, flush=True)
        doc["ok"] = all(d["verified"] for d in doc["rounds"])
    except KeyboardInterrupt:
        print("demo: interrupted: cleaning up", file=sys.stderr)
        doc["error"] = "interrupted"
    except (loopfs.LoopFSError, servers.ServerError, OSError, RuntimeError, PyexecError) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        doc["error"] = f"failed: {e}"
    except Exception as e:  # noqa: BLE001 - a driver error (psycopg, PyMySQL) is a failed demo, not a traceback
        print(f"demo: failed: {type(e).__name__}: {e}", file=sys.stderr)
        doc["error"] = f"failed: {type(e).__name__}: {e}"
    finally:
        # The cleanup must run to its end: a second Ctrl-C or SIGTERM waits for it.
        old_int = signal.signal(signal.SIGINT, signal.SIG_IGN)
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
        try:
            doc["promises"] = {k: v for k, v in PROMISES.items() if k in (engine, "unquiesced")}
            doc["compare"] = _compare(doc["rounds"]) if args.compare else None
            if site is not None:
                doc["run_dirs"] = site.run_dirs
                with contextlib.suppress(OSError):
                    path = os.path.join(site.dir, REPORT)
                    _write_report(path, doc)
                    if args.keep:
                        where.append(path)
                site.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if args.report:
        _write_report(args.report, doc)
        where.append(args.report)
    if doc.get("compare"):
        print("\nside by side (measured on the restored copies):\n" + _compare_table(doc["compare"]), file=out)
    emit()
    if doc["rounds"]:
        print("\nwhat was checked:", file=out)
        for k in ((engine,) if any(d["mode"] == "quiesced" for d in doc["rounds"]) else ()) + (
                ("unquiesced",) if any(d["mode"] == "unquiesced" for d in doc["rounds"]) else ()):
            print(f"  {'quiesced' if k == engine else 'unquiesced'}: {PROMISES[k]}", file=out)
    kinds = sorted({"application-consistent" if d["mode"] == "quiesced" else
                    "file-system-consistent (nothing quiesced)" for d in doc["rounds"]})
    result = f"{engine}: {' and '.join(kinds)} snapshots verified" if doc["ok"] else f"{engine}: NOT verified"
    print(f"demo: {result}; " + (f"full report in {' and '.join(where)}" if where else
                                 "--report PATH (or --json) keeps the full report"), file=out)
    return 0 if doc["ok"] else 1

