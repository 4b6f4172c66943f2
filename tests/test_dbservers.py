"""The sandbox's real database servers (pyexec/demo/servers.py): PostgreSQL and MariaDB on two loop
filesystems each (data on ext4, WAL or binlog + redo on xfs), restarted, crashed, and started again
from a copy of their directories as a second instance (the restore path).  Nothing is frozen here.

Afterwards no server process of the sandbox, mount or loop device is left (checked through /proc)."""
from __future__ import annotations

import os
import subprocess
import tempfile

import pytest
from helpers import IS_ROOT, db_procs_under, needs_xfs

from pyexec.demo import servers
from pyexec.demo.loopfs import LoopFS

# `make test` installs both servers (scripts/setup.sh): a missing one fails its tests, never skips them.
pytestmark = [pytest.mark.skipif(not IS_ROOT, reason="needs root: loop devices, mount, server users"),
              needs_xfs]



class Disks:
    """A data filesystem (ext4) and a log filesystem (xfs) under a test's tmp dir."""

    def __init__(self, tmp: str):
        self.tmp = tmp
        self.data = LoopFS(f"{tmp}/data.img", f"{tmp}/data", "ext4", 256)
        try:
            self.log = LoopFS(f"{tmp}/log.img", f"{tmp}/log", "xfs", 320)
        except BaseException:
            self.data.close()
            raise

    def close(self) -> None:
        self.log.close()
        self.data.close()


@pytest.fixture
def disks():
    """Two loop filesystems; afterwards no server, mount or loop device of the test is left."""
    # Not tmp_path: /tmp/pytest-of-root is 0700, and the servers run as postgres and mysql.
    with tempfile.TemporaryDirectory(prefix="pyexec-dbs-") as tmp:
        os.chmod(tmp, 0o711)
        d = Disks(tmp)
        images = [d.data.image, d.log.image]
        try:
            yield d
        finally:
            left = db_procs_under(tmp)
            d.close()
        assert not left, f"server processes left behind: {left}"
        with open("/proc/self/mountinfo") as f:
            assert tmp not in f.read(), "a mount of the test is left"
        for img in images:
            out = subprocess.run(["losetup", "-j", img], capture_output=True, text=True).stdout
            assert not out.strip(), f"loop device left: {out}"


def _copy(src: str, dst: str) -> None:
    # cp -a keeps owners, modes and pg_wal's symlink as they are: a restore, not a re-creation.
    subprocess.run(["cp", "-a", src, dst], check=True)


def test_postgres_restart_crash_and_restore(disks):
    import psycopg
    data, wal = f"{disks.data.mountpoint}/pg", f"{disks.log.mountpoint}/pgwal"
    pg = servers.PostgresServer(data, waldir=wal)
    rundirs = []
    try:
        start = pg.start()
        rundirs.append(pg.rundir)
        assert not start.recovered
        assert os.readlink(f"{data}/pg_wal") == wal
        assert os.stat(data).st_mode & 0o777 == 0o700
        assert pg.psql("SHOW listen_addresses") == ""
        assert pg.psql("SHOW fsync") == "on"
        with psycopg.connect(**pg.connect_args()) as con:
            con.execute("CREATE TABLE t (id int PRIMARY KEY, v text)")
            con.execute("INSERT INTO t VALUES (1, 'one')")
        pg.stop()
        assert not pg.running

        assert not pg.start().recovered  # same directories, after a clean shutdown
        rundirs.append(pg.rundir)
        assert pg.psql("SELECT v FROM t WHERE id = 1") == "one"
        with psycopg.connect(**pg.connect_args()) as con:
            con.execute("INSERT INTO t VALUES (2, 'two')")  # committed, then the crash
        pg.kill()

        # The restore path: a copy of the crashed directories, started as a second instance
        # beside the original (each recovers from the same WAL).
        cdata, cwal = f"{disks.data.mountpoint}/pg-copy", f"{disks.log.mountpoint}/pgwal-copy"
        _copy(data, cdata)
        _copy(wal, cwal)
        copy = servers.PostgresServer(cdata, waldir=cwal, port=5433, password=pg.password)
        with copy:
            rundirs.append(copy.rundir)
            st = copy.startup
            assert st is not None and st.recovered, st
            assert st.redo_start and st.redo_end and st.redo_bytes is not None and st.redo_bytes > 0, st
            assert os.readlink(f"{cdata}/pg_wal") == cwal  # not the original's WAL
            assert pg.start(existing=True).recovered
            rundirs.append(pg.rundir)
            assert copy.psql("SELECT string_agg(v, ',' ORDER BY id) FROM t") == "one,two"
            assert pg.psql("SELECT count(*) FROM t") == "2"
            copy.psql("INSERT INTO t VALUES (3, 'copy only')")
            assert pg.psql("SELECT count(*) FROM t") == "2"  # two instances, two clusters
    finally:
        pg.stop()
    assert not any(os.path.exists(r) for r in rundirs if r)


def test_postgres_failed_start_leaves_nothing(disks):
    data = f"{disks.data.mountpoint}/pg"
    with pytest.raises(servers.ServerError, match="no cluster"):
        servers.PostgresServer(data).start(existing=True)
    pg = servers.PostgresServer(data)
    pg.start()
    pg.stop()
    with open(f"{data}/postgresql.conf", "a") as f:
        f.write("no_such_setting = 1\n")
    with pytest.raises(servers.ServerError, match="no_such_setting"):
        pg.start()
    assert pg.rundir is None and pg.proc is None and not pg.running


def test_mariadb_restart_crash_and_restore(disks):
    import pymysql
    data, logs = f"{disks.data.mountpoint}/my", f"{disks.log.mountpoint}/mylog"
    db = servers.MariaDBServer(data, logdir=logs)
    rundirs = []
    try:
        assert not db.start().recovered
        rundirs.append(db.rundir)
        assert any(n.startswith("binlog.0") for n in os.listdir(logs))
        assert "ib_logfile0" in os.listdir(logs) and "ib_logfile0" not in os.listdir(data)
        assert db.sql("SELECT @@skip_networking, @@log_bin, @@sync_binlog, "
                      "@@innodb_flush_log_at_trx_commit") == "1\t1\t1\t1"
        db.create_user("app", "app-pw", "SELECT, INSERT, CREATE, RELOAD")
        con = pymysql.connect(**db.connect_args(user="app", password="app-pw"))
        with con:
            with con.cursor() as cur:
                cur.execute("CREATE DATABASE d")
                cur.execute("CREATE TABLE d.t (id int PRIMARY KEY, v text) ENGINE=InnoDB")
                cur.execute("INSERT INTO d.t VALUES (1, 'one')")
            con.commit()
        with pymysql.connect(**db.connect_args()) as con:  # root, by password
            with con.cursor() as cur:
                cur.execute("SELECT CURRENT_USER()")
                assert cur.fetchone() == ("root@localhost",)
        db.stop()

        assert not db.start().recovered
        rundirs.append(db.rundir)
        assert db.sql("SELECT v FROM d.t WHERE id = 1") == "one"
        db.sql("INSERT INTO d.t VALUES (2, 'two')")
        db.kill()

        cdata, clogs = f"{disks.data.mountpoint}/my-copy", f"{disks.log.mountpoint}/mylog-copy"
        _copy(data, cdata)
        _copy(logs, clogs)
        copy = servers.MariaDBServer(cdata, logdir=clogs, password=db.password, server_id=2)
        with copy:
            rundirs.append(copy.rundir)
            st = copy.startup
            assert st is not None and st.recovered, st
            with open(f"{clogs}/binlog.index") as f:
                assert all(ln.startswith(clogs + "/") for ln in f.read().split())
            assert db.start(existing=True).recovered
            rundirs.append(db.rundir)
            assert copy.sql("SELECT GROUP_CONCAT(v ORDER BY id) FROM d.t") == "one,two"
            copy.sql("INSERT INTO d.t VALUES (3, 'copy only')")
            assert db.sql("SELECT COUNT(*) FROM d.t") == "2"
    finally:
        db.stop()
    assert not any(os.path.exists(r) for r in rundirs if r)


def test_mariadb_failed_start_leaves_nothing(disks):
    data = f"{disks.data.mountpoint}/my"
    db = servers.MariaDBServer(data)
    with pytest.raises(servers.ServerError, match="no server"):
        db.start(existing=True)
    assert db.rundir is None and db.proc is None
