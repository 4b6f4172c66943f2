"""What a restored database must show: the promise each mode makes (PROMISES), and the engine's own
checks of a restored copy (PostgreSQL: pg_amcheck, pgbench's balances, the backup_label and where
recovery started; MariaDB: CHECK TABLE, balances, the GTID).  The ledger's checks are ledger.py's."""
from __future__ import annotations

import subprocess
from typing import Any

from pyexec import host
from pyexec.demo.pgserver import lsn_value
from pyexec.demo.servers import MariaDBServer, PostgresServer, Startup

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


def check_postgresql(r: PostgresServer, rep: host.RunReport, quiesce: bool, startup: Startup, out: dict[str, Any],
                     checks: dict[str, bool]) -> None:
    """A restored PostgreSQL copy: pg_amcheck, pgbench's sums; quiesced, the backup_label's start and where
    recovery started.  Figures go to out, verdicts to checks."""
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
            b and startup.redo_start and lsn_value(startup.redo_start) >= lsn_value(b))


def check_mariadb(r: MariaDBServer, rep: host.RunReport, quiesce: bool, out: dict[str, Any],
                  checks: dict[str, bool]) -> None:
    """A restored MariaDB copy: CHECK TABLE, balances against the history, the GTID against the quiesce's.
    Figures go to out, verdicts to checks."""
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
