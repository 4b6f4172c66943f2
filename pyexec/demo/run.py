"""`pyexec demo`: a live SQLite database snapshotted application-consistently, verified.

Sandbox: an outer btrfs loop image (the storage layer) holding two disk images, ext4 (the
database, WAL mode) and xfs (an append-only log), loop-mounted.  The demo application
writes to both; pre/post scripts quiesce and resume it over a Unix socket; pyexec freezes
both disks and reflinks (FICLONE) both images inside the window; the snapshots are then
mounted read-only and checked.  Everything is removed afterwards, on error or Ctrl-C too."""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import sqlite3
import statistics
import subprocess
import sys
import time
from typing import TypedDict

from pyexec import host, report
from pyexec.demo import app as demo_app
from pyexec.demo import dbdemo, fleetdemo, loopfs
from pyexec.demo.hostconf import write_host_config
from pyexec.demo.output import emit, last_line, say, write_report, write_sandbox_report
from pyexec.demo.sandbox import LoopSandbox, reflink
from pyexec.window import Window

Verification = dict[str, object]  # what verify() found: mounts, integrity_check, last row and record, verdict


class Round(TypedDict):
    """One round of the demo's report."""

    report: report.ReportDict
    verification: Verification


class Sandbox(LoopSandbox):
    """The demo's filesystems, application, scripts and configs; `close` removes it all."""

    def __init__(self, base: str | None, quiesce: bool):
        super().__init__("pyexec-demo-", base)
        self.app: subprocess.Popen[bytes] | None = None
        self.sock = os.path.join(self.dir, "app.sock")
        self.quiesce = quiesce

    def build(self) -> None:
        self.build_outer()
        say("two data disks inside it: ext4 for the database, xfs for the log")
        self.db_fs = self._mount(os.path.join("outer", "disk-db.img"), "db", "ext4", 128)
        self.log_fs = self._mount(os.path.join("outer", "disk-log.img"), "log", "xfs", 320)
        etc = os.path.join(self.dir, "etc")
        os.mkdir(etc, 0o700)
        self.state = os.path.join(self.dir, "state")
        os.mkdir(self.state, 0o700)
        py = sys.executable
        self.host_conf = write_host_config(
            etc, "demo-sqlite",
            f"# quiesce: finish in-flight transactions, checkpoint the WAL, hold writes\n"
            f"exec {py} -m pyexec.demo.app ctl quiesce {self.sock} > {self.state}/pre.out\n",
            f"exec {py} -m pyexec.demo.app ctl resume {self.sock} > {self.state}/post.out\n", quiesce=self.quiesce)

    def start_app(self) -> None:
        say("starting the application: 4 SQLite writer threads (WAL) + an append-only log")
        self.db = os.path.join(self.db_fs.mountpoint, "app.db")
        self.log = os.path.join(self.log_fs.mountpoint, "app.log")
        self.app = subprocess.Popen([sys.executable, "-m", "pyexec.demo.app", "serve", self.db, self.log, self.sock],
                                    stdout=subprocess.PIPE, cwd="/")
        if self.app.stdout is None or self.app.stdout.readline().strip() != b"ready":
            raise RuntimeError("the demo application did not start")
        time.sleep(0.5)

    def close(self, keep: bool) -> None:
        if self.app:
            self.app.kill()
            self.app.wait()
        self.thaw()
        if keep:
            say(f"--keep: sandbox left in {self.dir} (mounted); remove with umount + losetup -d")
            return
        self.remove()


def verify(sb: Sandbox, rnd: int, snaps: dict[str, str], pre_reply: str | None) -> Verification:
    """Mount the snapshot images read-only and check what the application left in them."""
    res: Verification = {"round": rnd}
    vdir = os.path.join(sb.dir, f"verify{rnd}")
    os.mkdir(vdir)
    mounted = []
    try:
        for name, img in snaps.items():
            mnt = os.path.join(vdir, name)
            os.mkdir(mnt)
            dev = subprocess.run(["losetup", "--find", "--show", "--read-only", img], check=True,
                                 capture_output=True, text=True).stdout.strip()
            opts = "ro,nouuid,norecovery" if name == "log" else "ro,noload"
            r = subprocess.run(["mount", "-o", opts, dev, mnt], capture_output=True, text=True)
            mounted.append((mnt, dev, r.returncode == 0))
            res[f"{name}_mounts_ro"] = r.returncode == 0
            if r.returncode != 0:
                res[f"{name}_mount_error"] = r.stderr.strip()
        db_mnt, log_mnt = (os.path.join(vdir, n) for n in ("db", "log"))
        # Open a copy: SQLite must be free to replay a WAL without touching the snapshot.
        work = os.path.join(vdir, "work")
        os.mkdir(work)
        for suffix in ("", "-wal"):
            src = os.path.join(db_mnt, "app.db" + suffix)
            if os.path.exists(src):
                shutil.copyfile(src, os.path.join(work, "app.db" + suffix))
        con = sqlite3.connect(os.path.join(work, "app.db"))
        res["integrity_check"] = con.execute("PRAGMA integrity_check").fetchone()[0]
        res["db_last_row"] = con.execute("SELECT max(id) FROM rows").fetchone()[0]
        res["wal_bytes_in_snapshot"] = (os.path.getsize(os.path.join(db_mnt, "app.db-wal"))
                                        if os.path.exists(os.path.join(db_mnt, "app.db-wal")) else 0)
        con.close()
        with open(os.path.join(log_mnt, "app.log"), "rb") as f:
            data = f.read()
        last = data.rstrip(b"\n").rsplit(b"\n", 1)[-1] if data else b""
        whole = data.endswith(b"\n") and len(last) > 7 and int(last[:6]) == len(last) - 7
        res["log_last_record_whole"] = bool(whole)
        res["log_last_seq"] = int(last[7:].split()[0]) if whole else None
        if pre_reply:
            row, seq = (int(x) for x in pre_reply.split())
            res["pre_script_last_row"] = row
            res["db_matches_quiesce_point"] = res["db_last_row"] == row
            res["log_matches_quiesce_point"] = res["log_last_seq"] == seq
        checks = [res.get("db_mounts_ro"), res.get("log_mounts_ro"), res["integrity_check"] == "ok",
                  res["log_last_record_whole"]]
        if pre_reply:
            checks += [res["db_matches_quiesce_point"], res["log_matches_quiesce_point"]]
        res["verified"] = all(checks)
    finally:
        for mnt, dev, ok in mounted:
            if ok:
                subprocess.run(["umount", mnt], check=False)
            subprocess.run(["losetup", "-d", dev], check=False)
    return res


def main(args: argparse.Namespace) -> int:
    """Run the demo; exit 0 only when every round ends verified and app-consistent (2: not root).

    Progress goes to stderr; each round's summary and the verdict to stdout, or, with --json, to
    stderr, and stdout gets the report alone (one JSON document, a failed demo included).  The
    report is written into the sandbox (kept with --keep) and to --report PATH if given, never
    into the working directory."""
    if getattr(args, "hosts", None):
        return fleetdemo.main(args)
    if getattr(args, "db", "sqlite") != "sqlite":
        return dbdemo.main(args)
    out = sys.stderr if args.json else sys.stdout
    if os.geteuid() != 0:
        print("pyexec demo: needs root (loop devices, mount, FIFREEZE)", file=sys.stderr)
        emit(args.json, {"rounds": [], "ok": False, "error": "needs root"})
        return 2
    signal.signal(signal.SIGTERM, lambda *_: (_ for _ in ()).throw(KeyboardInterrupt()))
    sb = Sandbox(args.dir, quiesce=not args.no_quiesce)
    rounds: list[Round] = []
    ok, error = True, None
    try:
        sb.build()
        sb.start_app()
        for rnd in range(1, args.rounds + 1):
            snaps = {"db": os.path.join(sb.outer.mountpoint, f"snap{rnd}-db.img"),
                     "log": os.path.join(sb.outer.mountpoint, f"snap{rnd}-log.img")}

            def take(window: Window | None, snaps: dict[str, str] = snaps) -> None:
                reflink(sb.db_fs.image, snaps["db"])
                reflink(sb.log_fs.image, snaps["log"])

            say(f"round {rnd}: check → pre-script (quiesce) → freeze ext4+xfs → reflink both images → thaw → "
                "post-script (resume)")
            rep = host.run(sb.host_conf, mount_points=[sb.db_fs.mountpoint, sb.log_fs.mountpoint], snapshot=take,
                           freeze_timeout=30, progress=lambda m: say("  " + m))
            pre_reply = None
            if sb.quiesce:
                with contextlib.suppress(OSError):
                    pre_reply = open(os.path.join(sb.state, "pre.out")).read().strip() or None
            say(f"round {rnd}: verifying the snapshot (read-only mounts, integrity_check, last row, last record)")
            v: Verification = verify(sb, rnd, snaps, pre_reply) if rep.snapshot == "taken" else {"verified": False}
            before = demo_app.ctl("stats", sb.sock)
            time.sleep(0.3)
            after = demo_app.ctl("stats", sb.sock)
            v["app_kept_running"] = int(after.split()[0]) > int(before.split()[0])
            rounds.append({"report": report.to_dict(rep), "verification": v})
            print(report.summary(rep), file=out)
            print(f"  verification: {_verdict(v)}", file=out)
            expected = host.APP if sb.quiesce else host.FS  # what the run must say of its snapshot
            ok = ok and bool(v["verified"]) and bool(v["app_kept_running"]) and rep.outcome == expected
            for img in snaps.values():
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(img)
        windows = [r["report"]["window"]["length_ns"] / 1e3 for r in rounds if r["report"]["window"]]
        if len(windows) > 1:
            print(f"freeze windows over {len(windows)} rounds: median {statistics.median(windows):.0f} µs, "
                  f"max {max(windows):.0f} µs", file=out)
    except KeyboardInterrupt:
        print("demo: interrupted: cleaning up", file=sys.stderr)
        ok, error = False, "interrupted"
    except (loopfs.LoopFSError, RuntimeError, OSError) as e:
        print(f"demo: failed: {e}", file=sys.stderr)
        ok, error = False, f"failed: {e}"
    finally:
        doc = {"rounds": rounds, "ok": ok, **({"error": error} if error else {})}
        where = write_sandbox_report(sb.dir, doc, args.keep)
        sb.close(keep=args.keep)
    if args.report:
        write_report(args.report, doc)
        where.append(args.report)
    emit(args.json, doc)
    kind = "application-consistent" if sb.quiesce else "file-system-consistent (nothing quiesced: --no-quiesce)"
    result = f"{kind} snapshot verified" if ok else "NOT verified (see above)"
    last_line(out, result, where)
    return 0 if ok else 1


def _verdict(v: Verification) -> str:
    parts = [f"integrity_check={v.get('integrity_check')}", f"db last row={v.get('db_last_row')}"]
    if "pre_script_last_row" in v:
        parts.append(f"quiesce point={v['pre_script_last_row']} ({'match' if v['db_matches_quiesce_point'] else 'MISMATCH'})")
    if "wal_bytes_in_snapshot" in v:
        parts.append(f"WAL in snapshot={v['wal_bytes_in_snapshot']} B")
    parts.append(f"log tail whole={v.get('log_last_record_whole')}")
    parts.append(f"app kept running={v.get('app_kept_running')}")
    return ", ".join(parts) + (" → VERIFIED" if v.get("verified") else " → NOT VERIFIED")
