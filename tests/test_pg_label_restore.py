"""The backup_label the PostgreSQL quiescer writes restores a snapshot that is NOT one atomic image.

A server keeps its data directory on one loop filesystem and pg_wal on another, and archives its WAL
to a directory on neither.  pyexec runs the postgresql plugin over both filesystems (CHECKPOINT,
pg_backup_start, freeze both, snapshot, thaw, pg_backup_stop, the label written after the thaw);
the snapshot copies only the data image inside the window.  The pg_wal image is copied later (its
own freeze, an instant of its own), while the load keeps committing and after a checkpoint has run
in between, as one would in a snapshot whose disks are minutes apart (checkpoint_timeout is 5 min).

Restored with the label (servers.PostgresServer.start_archive_recovery): pg_wal emptied, the
label from the post facts' path put into the data directory, recovery.signal, restore_command from
the archive, recovery_target 'immediate' (stop at the backup's consistency point, its stop LSN) and
promote.  Asserted: recovery reaches consistency exactly at the stop LSN and promotes, pg_amcheck is
clean, every ledger row acknowledged before pg_backup_stop was called (so every one acknowledged
before the freeze) is present, the ledger is gapless, and no row sent after the release returned
is (the restored state is the one at the stop LSN, not the archive's latest).

The negative control, the same pieces without the label (plain crash recovery): the data piece's
pg_control points at the backup's checkpoint, whose WAL segment the later pg_wal piece no longer
has (the checkpoint in between recycled it once it was archived), and PostgreSQL refuses to start
("could not locate a valid checkpoint record").  That refusal is what is reliably true of these
pieces and is asserted.  Without a checkpoint in between, crash recovery of the same pieces would
start and replay to the WAL piece's own instant: nothing in the pieces says which of the two cases
a given snapshot is, so neither is trustworthy without the label.  (Pieces in the other order, the
pg_wal piece older than the data piece, can start with data that no WAL explains: the label restore
covers that too, since its WAL comes from the archive up to a stop LSN after every piece.)"""
from __future__ import annotations

import contextlib
import os
import pathlib
import subprocess
import tempfile
import threading
import time

import orjson
import psycopg
import pytest
from helpers import IS_ROOT, Mounts
from test_config_trust import make

from pyexec import host, window
from pyexec.demo import loopfs
from pyexec.demo.servers import PostgresServer, ServerError

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: loop devices, mount, FIFREEZE, servers")
ARCHIVE_WAIT_S = 20.0


class Writer:
    """A client in autocommit: the ledger (numbered rows, each one's send and acknowledgement
    instants) or churn (updates of an indexed table: full-page writes after each checkpoint)."""

    def __init__(self, pg: PostgresServer, churn: bool = False):
        self.pg, self.churn = pg, churn
        self.rows: list[tuple[int, int, int]] = []  # (seq, sent_ns, acked_ns)
        self.error: BaseException | None = None
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            with psycopg.connect(**self.pg.connect_args(), autocommit=True) as c:
                seq = 0
                while not self.stop.is_set():
                    seq += 1
                    if self.churn:
                        c.execute("UPDATE acct SET bal = bal + 1 WHERE id = %s", ((seq * 7919) % 20000 + 1,))
                        continue
                    sent = time.monotonic_ns()
                    c.execute("INSERT INTO ledger VALUES (%s, %s)", (seq, sent))
                    self.rows.append((seq, sent, time.monotonic_ns()))
        except BaseException as e:  # noqa: BLE001 - the test asserts there was none
            self.error = e

    def finish(self) -> None:
        self.stop.set()
        self.thread.join(30)
        assert self.error is None, self.error


def amcheck(r: PostgresServer) -> subprocess.CompletedProcess[str]:
    return subprocess.run([r.bin["pg_amcheck"], "-h", str(r.sockdir), "-p", str(r.port), "-U", "postgres",
                           "-d", "postgres", "--heapallindexed"], capture_output=True, text=True, cwd="/",
                          env={"PATH": "/usr/bin:/bin", "LC_ALL": "C", "PGPASSWORD": r.password}, timeout=60)


def copy(src: str, dst: str) -> str:
    subprocess.run(["cp", "--sparse=always", src, dst], check=True)
    return dst


def test_backup_label_restores_a_non_atomic_snapshot_and_crash_recovery_does_not():
    t0 = time.monotonic()
    with contextlib.ExitStack() as stack:
        tmp = pathlib.Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="pyexec-label-")))
        os.chmod(tmp, 0o711)  # the server runs as postgres
        mounts = Mounts(tmp)
        stack.callback(lambda: assert_clean(tmp))
        stack.callback(mounts.close)
        data, wal = mounts.make("ext4", 160), mounts.make("ext4", 128)
        archive = str(tmp / "archive")  # on neither frozen filesystem
        pg = PostgresServer(os.path.join(data.mountpoint, "db"), waldir=os.path.join(wal.mountpoint, "wal"),
                            archive_dir=archive)
        stack.callback(pg.stop)
        pg.start()
        pg.psql("CREATE EXTENSION amcheck; CREATE TABLE ledger (seq int PRIMARY KEY, sent_ns bigint); "
                "CREATE TABLE acct (id int PRIMARY KEY, bal bigint NOT NULL); "
                "INSERT INTO acct SELECT g, 0 FROM generate_series(1, 20000) g")
        conf = tmp / "conf"
        cred = make(conf / "cred", (pg.password + "\n").encode(), mode=0o600)
        pj = make(conf / "pg.json", orjson.dumps({"host": str(pg.sockdir), "user": "postgres", "credentialsFile": cred,
                                                   "timeoutInSeconds": 20, "backupLabelDirectory": str(tmp / "labels")}),
                  mode=0o600)
        hc = make(conf / "host.conf", (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                                       f"pluginName0 = postgresql\npluginPath0 = builtin\npluginConfigPath0 = {pj}\n"
                                       ).encode(), mode=0o600)
        os.chmod(conf, 0o700)
        ledger, churn = Writer(pg), Writer(pg, churn=True)
        stack.callback(churn.stop.set)
        stack.callback(ledger.stop.set)
        time.sleep(1.0)

        # The snapshot: the data image only, inside the window.
        snaps = {"data": str(tmp / "snap-data.img"), "wal": str(tmp / "snap-wal.img")}
        stamps: dict[str, int] = {}

        def progress(msg: str) -> None:
            if msg.startswith("post-scripts"):
                stamps["post_start"] = time.monotonic_ns()

        rep = host.run(hc, [data.mountpoint, wal.mountpoint], snapshot=lambda w: copy(data.image, snaps["data"]),
                       freeze_timeout=20, progress=progress)
        released = time.monotonic_ns()
        assert rep.outcome == host.APP and rep.snapshot == "taken", (rep.pre, rep.post, rep.snapshot_detail)
        pre, post = rep.pre[0].facts, rep.post[0].facts
        label, stop = post["backup_label"], post["backup_stop_lsn"]
        # The checkpoint the backup (and the data piece's pg_control) starts from, and its segment.
        ckpt = next(ln.split()[2] for ln in open(label) if ln.startswith("CHECKPOINT LOCATION:"))
        ckpt_seg = pg.psql(f"SELECT pg_walfile_name('{ckpt}')")
        assert rep.window is not None and "post_start" in stamps
        freeze_start = rep.window.start_ns

        # Later, the load still running: a checkpoint (once the backup's WAL is archived), then the
        # pg_wal image, copied in a freeze of its own: a second instant.
        time.sleep(0.5)
        switched = pg.psql("SELECT pg_switch_wal()")
        pg.wait_archived(stop, ARCHIVE_WAIT_S)  # the restore needs the WAL up to the stop LSN
        pg.wait_archived(switched, ARCHIVE_WAIT_S)  # a segment is recycled only once archived
        pg.psql("CHECKPOINT")
        time.sleep(0.3)
        with window.freeze([wal.mountpoint], timeout=20):
            copy(wal.image, snaps["wal"])
        time.sleep(0.3)
        ledger.finish()
        churn.finish()
        pg.stop()
        assert any(sent > released for _, sent, _ in ledger.rows), "the load did not continue after the release"
        for k in ("data", "wal"):  # the same pieces for the negative control
            copy(snaps[k], snaps[k] + ".2")
        setup_s = time.monotonic() - t0

        # Restore with the label and the archive.
        t1 = time.monotonic()
        rd = loopfs.LoopFS(snaps["data"], str(tmp / "r-data"), "ext4", create=False)
        stack.callback(rd.close)
        rw = loopfs.LoopFS(snaps["wal"], str(tmp / "r-wal"), "ext4", create=False)
        stack.callback(rw.close)
        r = PostgresServer(os.path.join(rd.mountpoint, "db"), waldir=os.path.join(rw.mountpoint, "wal"),
                           password=pg.password)
        stack.callback(r.stop)
        st = r.start_archive_recovery(label, archive)
        assert st.archive_recovery and st.promoted and st.timeline == 2, st
        assert st.backup_end == st.consistent_at == stop, (st.backup_end, st.consistent_at, stop, st.log)
        assert st.stopped == "recovery stopping after reaching consistency", st.log
        assert st.redo_start == pre["backup_start_lsn"], st  # from the label's checkpoint, not pg_control's
        assert st.restored_files >= 1
        am = amcheck(r)
        assert am.returncode == 0 and not am.stdout.strip(), am.stdout + am.stderr
        present = {int(x) for x in r.psql("SELECT seq FROM ledger").split()}
        acked_before_freeze = {s for s, _, ack in ledger.rows if ack < freeze_start}
        acked_before_stop = {s for s, _, ack in ledger.rows if ack < stamps["post_start"]}
        sent_after_release = {s for s, sent, _ in ledger.rows if sent > released}
        assert acked_before_freeze and acked_before_freeze <= acked_before_stop
        assert not acked_before_stop - present, sorted(acked_before_stop - present)[:10]
        assert present == set(range(1, max(present) + 1)), "the ledger has a gap"
        assert sent_after_release and not present & sent_after_release
        r.stop()
        rw.close()
        rd.close()
        label_s = time.monotonic() - t1

        # The negative control: the same pieces, no label, crash recovery.
        nd = loopfs.LoopFS(snaps["data"] + ".2", str(tmp / "n-data"), "ext4", create=False)
        stack.callback(nd.close)
        nw = loopfs.LoopFS(snaps["wal"] + ".2", str(tmp / "n-wal"), "ext4", create=False)
        stack.callback(nw.close)
        assert not os.path.exists(os.path.join(nw.mountpoint, "wal", ckpt_seg)), "the checkpoint's WAL is still there"
        n = PostgresServer(os.path.join(nd.mountpoint, "db"), waldir=os.path.join(nw.mountpoint, "wal"),
                           password=pg.password)
        stack.callback(n.stop)
        with pytest.raises(ServerError) as refused:
            n.start(existing=True)
        assert "could not locate a valid checkpoint record" in str(refused.value), refused.value
        assert not n.running
        print(f"\nsetup+run+pieces {setup_s:.1f}s; label restore {label_s:.1f}s (start {st.seconds:.2f}s, "
              f"consistent at {st.consistent_at}, {st.restored_files} files from the archive, "
              f"redo {st.redo_start} → {st.redo_end}); rows {len(present)} restored of {len(ledger.rows)} written, "
              f"{len(acked_before_freeze)} acked before the freeze; crash recovery refused: "
              f"{next(ln for ln in str(refused.value).splitlines() if 'PANIC' in ln).split('  ')[-1]}")


def assert_clean(tmp: pathlib.Path) -> None:
    """No mount, loop device or server process of this test is left."""
    assert str(tmp) not in open("/proc/self/mountinfo").read()
    assert str(tmp) not in subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError):
                assert not os.readlink(f"/proc/{d}/cwd").startswith(str(tmp)), d
