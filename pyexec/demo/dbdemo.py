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
import os
import signal
import sys
from typing import Any

from pyexec.demo import loopfs, servers
from pyexec.demo.dbsite import Site
from pyexec.demo.dbsummary import compare, compare_table, round_summary
from pyexec.demo.dbverify import PROMISES
from pyexec.demo.output import emit, last_line, write_report, write_sandbox_report
from pyexec.errors import PyexecError
from pyexec.quiesce import load_driver


def _raise_interrupt(*_: object) -> None:
    raise KeyboardInterrupt


def main(args: argparse.Namespace) -> int:
    """The database demo; exit 0 only when every round verifies what its mode promises (1: not verified
    or failed; 2: not root, or a server binary or driver is missing)."""
    engine: str = args.db
    out = sys.stderr if args.json else sys.stdout
    doc: dict[str, Any] = {"db": engine, "rounds": [], "ok": False}
    if os.geteuid() != 0:
        print("pyexec demo: needs root (loop devices, mount, FIFREEZE, server users)", file=sys.stderr)
        doc["error"] = "needs root"
        emit(args.json, doc)
        return 2
    try:
        (servers.PostgresServer if engine == "postgresql" else servers.MariaDBServer).find_binaries()
        load_driver(engine, "")
    except (servers.ServerError, PyexecError) as e:
        msg = str(e) if isinstance(e, servers.ServerError) else f"{e.describe()} (or run scripts/setup.sh)"
        print(f"pyexec demo: {msg}", file=sys.stderr)
        doc["error"] = msg
        emit(args.json, doc)
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
            print(round_summary(d), file=out, flush=True)
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
            doc["compare"] = compare(doc["rounds"]) if args.compare else None
            if site is not None:
                doc["run_dirs"] = site.run_dirs
                where = write_sandbox_report(site.dir, doc, args.keep)
                site.close()
        finally:
            signal.signal(signal.SIGINT, old_int)
            signal.signal(signal.SIGTERM, old_term)
    if args.report:
        write_report(args.report, doc)
        where.append(args.report)
    if doc.get("compare"):
        print("\nside by side (measured on the restored copies):\n" + compare_table(doc["compare"]), file=out)
    emit(args.json, doc)
    if doc["rounds"]:
        print("\nwhat was checked:", file=out)
        for k in ((engine,) if any(d["mode"] == "quiesced" for d in doc["rounds"]) else ()) + (
                ("unquiesced",) if any(d["mode"] == "unquiesced" for d in doc["rounds"]) else ()):
            print(f"  {'quiesced' if k == engine else 'unquiesced'}: {PROMISES[k]}", file=out)
    kinds = sorted({"application-consistent" if d["mode"] == "quiesced" else
                    "file-system-consistent (nothing quiesced)" for d in doc["rounds"]})
    result = f"{engine}: {' and '.join(kinds)} snapshots verified" if doc["ok"] else f"{engine}: NOT verified"
    last_line(out, result, where)
    return 0 if doc["ok"] else 1

