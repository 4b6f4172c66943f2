"""The rounds' restores: a snapshot's two reflinked images attached on new loop devices and a second
server started on them, by crash recovery, or (a quiesced PostgreSQL round) by archive recovery from
the backup_label the quiescer wrote, the WAL from the original's archive; then what the restored copy
must show (dbverify.py, ledger.py)."""
from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator
from typing import Any

from pyexec import host
from pyexec.demo import dbverify, ledger, loopfs
from pyexec.demo.servers import MariaDBServer, PostgresServer, ServerError, Startup

ARCHIVE_WAIT_S = 30.0  # for the segment holding the backup's stop LSN to be archived


def startup_doc(startup: Startup) -> dict[str, Any]:
    """A restored server's Startup as report fields: its first 20 recovery log lines, not all."""
    doc = {k: v for k, v in dataclasses.asdict(startup).items() if k != "log"}
    doc["log"] = startup.log[:20]
    return doc


class Restores:
    """The restores of one sandbox (its directory, its engine): the restored disks (`fs`) and the
    restored server (`server`) while one runs, each server's run directory added to run_dirs."""

    def __init__(self, sandbox: str, engine: str, keep: bool, run_dirs: list[str]):
        self.dir, self.engine, self.keep, self.run_dirs = sandbox, engine, keep, run_dirs
        self.fs: list[loopfs.LoopFS] = []
        self.server: PostgresServer | MariaDBServer | None = None

    @contextlib.contextmanager
    def _disks(self, name: str, data_img: str, wal_img: str) -> Iterator[tuple[loopfs.LoopFS, loopfs.LoopFS]]:
        """The snapshot's two images on new loop devices under a directory `name` of the sandbox; afterwards
        the restored server is stopped and the disks detached (their images kept with --keep)."""
        rdir = os.path.join(self.dir, name)
        os.mkdir(rdir, 0o711)
        data = loopfs.LoopFS(data_img, os.path.join(rdir, "data"), "ext4", create=False)
        self.fs.append(data)
        # The copy has its original's xfs UUID, and the original is mounted: nouuid (xfs(5)).
        wal = loopfs.LoopFS(wal_img, os.path.join(rdir, "wal"), "xfs", create=False, options="nouuid")
        self.fs.append(wal)
        try:
            yield data, wal
        finally:
            if self.server is not None:
                self.server.stop()
                self.server = None
            for m in (wal, data):
                m.close(remove_image=not self.keep)
                self.fs.remove(m)
            with contextlib.suppress(OSError):
                os.rmdir(rdir)

    def crash_recovery(self, original: PostgresServer | MariaDBServer, rnd: int, snaps: dict[str, str],
                       rep: host.RunReport, led: ledger.Ledger, st: ledger.Stamps,
                       quiesce: bool) -> tuple[dict[str, Any], dict[str, bool]]:
        """Round rnd's snapshot restored by crash recovery and checked: (report fields, checks)."""
        out: dict[str, Any] = {}
        checks: dict[str, bool] = {}
        with self._disks(f"restore{rnd}", snaps["data"], snaps["wal"]) as (data, wal):
            if isinstance(original, PostgresServer):
                r: PostgresServer | MariaDBServer = PostgresServer(
                    os.path.join(data.mountpoint, "pg"), waldir=os.path.join(wal.mountpoint, "pg_wal"),
                    password=original.password)
            else:
                r = MariaDBServer(os.path.join(data.mountpoint, "db"), logdir=os.path.join(wal.mountpoint, "log"),
                                  password=original.password, server_id=2)
            self.server = r
            try:
                startup = r.start(existing=True)
                self.run_dirs += [r.rundir] if r.rundir else []
            except ServerError as e:
                out["start_error"] = str(e)
                checks["restored server starts"] = False
                return out, checks
            checks["restored server starts"] = True
            out["startup"] = startup_doc(startup)
            if isinstance(r, PostgresServer):
                dbverify.check_postgresql(r, rep, quiesce, startup, out, checks)
            else:
                dbverify.check_mariadb(r, rep, quiesce, out, checks)
            present = ledger.restored_rows(r, rnd)
            ledger.check_crash_restore(led, present, st, quiesce and self.engine == "mariadb", out, checks)
        return out, checks

    def archive_recovery(self, original: PostgresServer, rnd: int, snaps: dict[str, str], rep: host.RunReport,
                         led: ledger.Ledger, st: ledger.Stamps) -> tuple[dict[str, Any], dict[str, bool]]:
        """The round's snapshot restored by archive recovery from the quiescer's backup_label."""
        pre, post = rep.pre[0].facts, rep.post[0].facts
        stop, label = post["backup_stop_lsn"], post.get("backup_label", "")
        out: dict[str, Any] = {"backup_label": label, "backup_stop_lsn": stop}
        checks: dict[str, bool] = {}
        try:
            out["archived_to"] = original.wait_archived(stop, ARCHIVE_WAIT_S)
        except ServerError as e:
            out["start_error"] = str(e)
            checks["the WAL up to the stop LSN is archived"] = False
            return out, checks
        with self._disks(f"restore{rnd}-label", snaps["data-label"], snaps["wal-label"]) as (data, wal):
            r = PostgresServer(os.path.join(data.mountpoint, "pg"), waldir=os.path.join(wal.mountpoint, "pg_wal"),
                               password=original.password)
            self.server = r
            try:
                startup = r.start_archive_recovery(label, os.path.join(self.dir, "archive"))
                self.run_dirs += [r.rundir] if r.rundir else []
            except (ServerError, OSError) as e:
                out["start_error"] = str(e)
                checks["restored server starts by archive recovery and is promoted"] = False
                return out, checks
            out["startup"] = startup_doc(startup)
            checks["restored server starts by archive recovery and is promoted"] = (
                startup.archive_recovery and startup.promoted)
            checks["consistent exactly at the backup's stop LSN"] = startup.consistent_at == stop
            checks["redo starts at the backup's start LSN (the label's checkpoint)"] = (
                startup.redo_start == pre.get("backup_start_lsn"))
            dbverify.check_postgresql(r, rep, False, startup, out, checks)
            ledger.check_label_restore(led, ledger.restored_rows(r, rnd), st, out, checks)
        return out, checks
