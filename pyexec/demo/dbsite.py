"""The database demo's site: its sandbox (an outer btrfs image, the data disk and the log disk in it),
the original server under load with its quiescer's user and configuration, and the rounds: load and
ledger, pyexec's run (quiesce, freeze both disks, reflink both images, thaw, release), the restores."""
from __future__ import annotations

import contextlib
import dataclasses
import os
import secrets
import subprocess
import time
from types import ModuleType
from typing import Any

import orjson

from pyexec import host, native, report
from pyexec.demo.dbload import (
    MARIADB_ACCOUNTS,
    MARIADB_WRITERS,
    PGBENCH_CLIENTS,
    PGBENCH_SCALE,
    PGBENCH_SECONDS,
    PgBench,
    TxnLoad,
)
from pyexec.demo.dbrestore import Restores
from pyexec.demo.dbverify import PROMISES
from pyexec.demo.ledger import Ledger, Stamps
from pyexec.demo.output import say, write_file
from pyexec.demo.sandbox import LoopSandbox, reflink
from pyexec.demo.servers import MariaDBServer, PostgresServer, ServerError
from pyexec.quiesce import load_driver
from pyexec.window import Window

WARMUP_S = 1.5  # load before the snapshot
AFTER_S = 1.0  # load after the release: rows the snapshot must not have
PG_BACKUP_USER = "pyexec_backup"
MARIADB_BACKUP_USER = "pyexec_backup"
# FLUSH TABLES WITH READ LOCK and FLUSH ENGINE LOGS need RELOAD; SHOW MASTER STATUS needs BINLOG MONITOR
# (MariaDB 10.5+; SUPER before); PROCESS lets the quiescer name the statements its lock waited for.
# Not CONNECTION ADMIN: the quiescer's watchdog KILLs only its own session, which needs no privilege.
MARIADB_BACKUP_PRIVS = "RELOAD, PROCESS, BINLOG MONITOR"


class Site(LoopSandbox):
    """The sandbox, the server and its quiescer configuration, the rounds, and their restores."""

    def __init__(self, engine: str, base: str | None, keep: bool):
        self.engine, self.keep = engine, keep
        super().__init__(f"pyexec-demo-{engine}-", base)
        os.chmod(self.dir, 0o711)  # the servers run as postgres / mysql and must reach their directories
        self.server: PostgresServer | MariaDBServer | None = None
        self.workers: list[Ledger | TxnLoad | PgBench] = []
        self.run_dirs: list[str] = []  # every server's run directory in /run (all gone after close())
        self.restores = Restores(self.dir, engine, keep, self.run_dirs)
        self.driver: ModuleType = load_driver(engine, "")

    # ---- setup
    def build(self) -> None:
        """The outer image and the two disks in it, mounted; etc/, state/ and labels/ beside them."""
        self.build_outer()
        log = "pg_wal" if self.engine == "postgresql" else "binlog + InnoDB redo log"
        say(f"two disks inside it: ext4 for the data directory, xfs for the {log}")
        self.data = self._mount(os.path.join("outer", "disk-data.img"), "data", "ext4", 256)
        self.wal = self._mount(os.path.join("outer", "disk-wal.img"), "wal", "xfs", 320)
        for d in ("etc", "state", "labels"):
            os.mkdir(os.path.join(self.dir, d), 0o700)

    def start_server(self) -> None:
        """The original server started, its tables and the quiescer's user made; the host configs written."""
        if self.engine == "postgresql":
            say("starting PostgreSQL (initdb; socket and log in /run, WAL on the xfs disk)")
            # The WAL archive is on neither disk (in the sandbox, beside them): the label restore's WAL.
            pg = self.server = PostgresServer(os.path.join(self.data.mountpoint, "pg"),
                                              waldir=os.path.join(self.wal.mountpoint, "pg_wal"),
                                              archive_dir=os.path.join(self.dir, "archive"))
            try:
                pg.start()
            finally:
                self.run_dirs += [pg.rundir] if pg.rundir else []
            pg.psql("CREATE DATABASE bench")
            say(f"pgbench -i -s {PGBENCH_SCALE}; amcheck installed for the restore's pg_amcheck")
            assert pg.sockdir is not None
            res = subprocess.run([pg.bin["pgbench"], "-i", "-q", "-s", str(PGBENCH_SCALE), "-h", pg.sockdir,
                                  "-p", str(pg.port), "-U", "postgres", "bench"], capture_output=True, text=True,
                                 env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": pg.password},
                                 cwd="/", timeout=300, check=False)
            if res.returncode != 0:
                raise ServerError(f"pgbench -i failed: {res.stderr.strip()}")
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
            say("starting MariaDB (socket and log in /run, binlog + InnoDB redo log on the xfs disk)")
            my = self.server = MariaDBServer(os.path.join(self.data.mountpoint, "db"),
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
            say(f"quiescer user {MARIADB_BACKUP_USER}@localhost: {MARIADB_BACKUP_PRIVS}")
            db = {"host": my.socket_path, "user": MARIADB_BACKUP_USER, "lockWaitTimeoutInSeconds": 10}
        etc = os.path.join(self.dir, "etc")
        db |= {"credentialsFile": write_file(os.path.join(etc, "credentials"), pw + "\n", 0o600),
               "timeoutInSeconds": 20}
        pj = write_file(os.path.join(etc, f"{self.engine}.json"), orjson.dumps(db, option=orjson.OPT_INDENT_2).decode(),
                        0o600)
        self.host_conf = {
            True: write_file(os.path.join(etc, "VMSnapshotPluginHost.conf"),
                             f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\npluginName0 = {self.engine}\n"
                             f"pluginPath0 = builtin\npluginConfigPath0 = {pj}\n", 0o600),
            # Unquiesced: no plugin at all, so the run itself says what the snapshot is.
            False: write_file(os.path.join(etc, "VMSnapshotPluginHost-none.conf"),
                              "[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 0\n", 0o600)}

    def connect(self) -> Any:
        """A client session of the original server (autocommit)."""
        if isinstance(self.server, PostgresServer):
            return self.driver.connect(**self.server.connect_args(dbname="bench"), autocommit=True)
        assert self.server is not None
        return self.driver.connect(**self.server.connect_args(database="demo"), autocommit=True)

    def connect_txn(self) -> Any:
        """A client session of the original MariaDB server (transactions)."""
        assert isinstance(self.server, MariaDBServer)
        return self.driver.connect(**self.server.connect_args(database="demo"), autocommit=False)

    # ---- one round
    def round(self, rnd: int, quiesce: bool) -> dict[str, Any]:
        """One round under load (quiesced or not), its snapshot restored and checked: its report entry."""
        mode = "quiesced" if quiesce else "unquiesced"
        state = os.path.join(self.dir, "state")
        snaps = {"data": os.path.join(self.outer.mountpoint, f"snap{rnd}-data.img"),
                 "wal": os.path.join(self.outer.mountpoint, f"snap{rnd}-wal.img")}
        load: PgBench | TxnLoad
        if isinstance(self.server, PostgresServer):
            say(f"round {rnd} ({mode}): pgbench -c {PGBENCH_CLIENTS} -P 1 in the background + the ledger writer")
            load = PgBench(self.server, os.path.join(state, f"pgbench-r{rnd}"),
                           os.path.join(state, f"pgbench-summary-r{rnd}.txt"))
        else:
            say(f"round {rnd} ({mode}): {MARIADB_WRITERS} PyMySQL transaction writers + the ledger writer")
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
            say("  " + msg)

        def take(window: Window | None) -> None:
            reflink(self.data.image, snaps["data"])
            reflink(self.wal.image, snaps["wal"])

        what = ("pre (quiesce: " + ("CHECKPOINT + pg_backup_start" if self.engine == "postgresql"
                                     else "FLUSH TABLES WITH READ LOCK") + ")") if quiesce else "no plugin"
        say(f"round {rnd}: {what} → freeze ext4+xfs → reflink both images → thaw"
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
            if load.proc.returncode == 0 and time.monotonic_ns() < stamps.thaw_end + native.ns_from_s(AFTER_S):
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
            say(f"round {rnd}: restoring: the reflinked images on new loop devices, a second server, "
                "crash recovery, then the checks")
            assert self.server is not None
            restore, rchecks = self.restores.crash_recovery(self.server, rnd, snaps, rep, ledger, stamps, quiesce)
            doc["restore"] = restore
            checks |= rchecks
            if label_restore and rep.post and rep.post[0].facts.get("backup_stop_lsn"):
                say(f"round {rnd}: restoring again, with the backup_label: pg_wal emptied, WAL from the "
                    "archive, archive recovery to the backup's consistency point")
                assert isinstance(self.server, PostgresServer)
                lrest, lchecks = self.restores.archive_recovery(self.server, rnd, snaps, rep, ledger, stamps)
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

    # ---- teardown
    def close(self) -> None:
        """Stop everything started, thaw, unmount, detach, remove (servers are stopped even with --keep)."""
        for w in self.workers:
            if isinstance(w, PgBench):
                w.kill()
            else:
                w.stop.set()
        self.thaw()  # a frozen disk would hang everything below: thaw first
        for m in self.restores.fs:
            m.thaw()
        for srv in (self.restores.server, self.server):
            if srv is not None:
                with contextlib.suppress(Exception):
                    srv.stop()
        self.restores.server = self.server = None
        for w in self.workers:
            for t in ([w.thread] if isinstance(w, Ledger) else w.threads if isinstance(w, TxnLoad) else [w.relay]):
                if t.is_alive():
                    t.join(10)
        for m in reversed(self.restores.fs):
            m.close(remove_image=not self.keep)
        if self.keep:
            say(f"--keep: sandbox left in {self.dir} (mounted; servers stopped); remove with umount + losetup -d")
            return
        self.remove()
