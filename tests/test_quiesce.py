"""The built-in quiescers on real servers: the lock really spans the window, the snapshot restores
without what waited on it, and every failure path ends with a clear code and nothing held."""
from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time

import orjson
import psycopg
import pymysql
import pytest
from helpers import IS_ROOT, Mounts, db_sandbox, kill_with_descendants, procs_matching
from test_config_trust import make

from pyexec import host, window
from pyexec.demo import loopfs
from pyexec.demo.servers import MariaDBServer, PostgresServer

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: loop devices, mount, FIFREEZE, servers")
PYEXEC = [sys.executable, "-m", "pyexec.cli"]
BACKUP_PRIVS = "RELOAD, PROCESS, BINLOG MONITOR"  # what the quiescer needs (README), no more


class Site:
    """A server on two loop filesystems (data; WAL or binlog + redo), which tests freeze."""

    def __init__(self, engine: str, tmp, mounts: Mounts):
        self.engine, self.tmp, self.mounts = engine, tmp, mounts
        self.data = mounts.make("ext4", 160)
        self.logs = mounts.make("ext4", 96)
        self.mount_points = [self.data.mountpoint, self.logs.mountpoint]
        if engine == "mariadb":
            self.server: MariaDBServer | PostgresServer = MariaDBServer(
                os.path.join(self.data.mountpoint, "db"), logdir=os.path.join(self.logs.mountpoint, "log"))
        else:
            self.server = PostgresServer(os.path.join(self.data.mountpoint, "db"),
                                         waldir=os.path.join(self.logs.mountpoint, "wal"))
        self.server.start()
        self.user, self.password = ("bk", "bk-secret") if engine == "mariadb" else ("postgres", self.server.password)
        if isinstance(self.server, MariaDBServer):
            self.server.create_user(self.user, self.password, BACKUP_PRIVS)
            self.server.sql("CREATE DATABASE IF NOT EXISTS app; CREATE TABLE IF NOT EXISTS app.t "
                            "(id INT PRIMARY KEY, who VARCHAR(20)) ENGINE=InnoDB")
        else:
            self.server.psql("CREATE TABLE IF NOT EXISTS t (id int PRIMARY KEY, who text)")

    @property
    def host(self) -> str:
        s = self.server
        return s.socket_path if isinstance(s, MariaDBServer) else str(s.sockdir)

    def setup(self, name: str, password: str | None = None, cred_mode: int = 0o600, **doc) -> str:
        """A host config with this engine's built-in plugin; returns its path."""
        d = self.tmp / name
        d.mkdir()
        os.chmod(d, 0o700)
        cred = make(d / "cred", ((password if password is not None else self.password) + "\n").encode(),
                    mode=cred_mode)
        conf = {"host": self.host, "user": self.user, "credentialsFile": cred, "timeoutInSeconds": 20,
                "backupLabelDirectory": str(d / "labels"), **doc}
        if self.engine == "mariadb":
            conf.pop("backupLabelDirectory")
            conf.setdefault("lockWaitTimeoutInSeconds", 3)
        pj = make(d / "db.json", orjson.dumps(conf), mode=0o600)
        return make(d / "host.conf", (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                                      f"pluginName0 = {self.engine}\npluginPath0 = builtin\n"
                                      f"pluginConfigPath0 = {pj}\n").encode(), mode=0o600)

    def connect(self):
        if isinstance(self.server, MariaDBServer):
            return pymysql.connect(**self.server.connect_args(), database="app", autocommit=True)
        return psycopg.connect(**self.server.connect_args(), autocommit=True)

    def close(self):
        self.server.stop()


def sandbox(engine: str):
    """A Site of engine in its own sandbox (helpers.db_sandbox: nothing of it left afterwards)."""
    return db_sandbox(f"pyexec-q-{engine}-", lambda tmp, mounts: Site(engine, tmp, mounts))


@pytest.fixture(scope="module", params=["mariadb", "postgresql"])
def site(request):
    """One server per engine for the module (a test of one engine parametrizes it indirectly)."""
    with sandbox(request.param) as s:
        yield s


MARIADB = pytest.mark.parametrize("site", ["mariadb"], indirect=True)
POSTGRESQL = pytest.mark.parametrize("site", ["postgresql"], indirect=True)


@pytest.fixture
def any_site(site):
    """The module's server, with the mounts' watchdog rearmed for this test."""
    site.mounts.rearm()
    return site


def readlock_holders(m: Site) -> list[str]:
    """What other sessions of the MariaDB server are doing (FTWRL still held or waited for shows here)."""
    return m.server.sql("SELECT COALESCE(INFO, '') FROM information_schema.PROCESSLIST "
                        "WHERE INFO LIKE 'FLUSH%' OR STATE LIKE '%lock%'").splitlines()


def write_now(m: Site, row: int, timeout: float = 5.0) -> None:
    """An insert that must not wait for anything (nothing is held)."""
    with m.connect() as c:
        if m.engine == "mariadb":
            c.cursor().execute(f"SET SESSION lock_wait_timeout = {int(timeout)}")
            c.cursor().execute(f"INSERT INTO t VALUES ({row}, 'after')")
        else:
            c.execute(f"SET statement_timeout = {int(timeout * 1000)}")
            c.execute(f"INSERT INTO t VALUES ({row}, 'after')")


def long_update(m: Site, row: int, seconds: int) -> subprocess.Popen:
    """A client running an UPDATE of row that takes seconds, once the server shows it running."""
    m.server.sql(f"INSERT IGNORE INTO app.t VALUES ({row}, 'long')")
    tag = f"SLEEP({seconds})"
    proc = subprocess.Popen([m.server.bin["mariadb"], f"--defaults-file={m.server._cnf()}", "app", "-e",
                             f"UPDATE t SET who = CONCAT(who, {tag}) WHERE id = {row}"])
    deadline = time.monotonic() + 5
    while not m.server.sql(f"SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%{tag}%' "
                           "AND INFO NOT LIKE '%PROCESSLIST%'"):
        assert time.monotonic() < deadline and proc.poll() is None, "the long UPDATE did not start"
        time.sleep(0.02)
    return proc


def end_long_update(m: Site, proc: subprocess.Popen) -> None:
    """Kill the client and its statement on the server (a killed client's statement runs on)."""
    proc.kill()
    proc.wait()
    for i in m.server.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%SLEEP(%' "
                          "AND INFO NOT LIKE '%PROCESSLIST%'").split():
        with contextlib.suppress(Exception):
            m.server.sql(f"KILL {int(i)}")


def write_waits_for_the_readlock(m: Site) -> bool:
    """An insert with lock_wait_timeout 1 s fails with ER_LOCK_WAIT_TIMEOUT: the read lock is held."""
    with m.connect() as c:
        c.cursor().execute("SET SESSION lock_wait_timeout = 1")
        try:
            c.cursor().execute("INSERT INTO t VALUES (999, 'blocked')")
        except pymysql.err.OperationalError as e:
            assert e.args[0] == 1205, e
            return True
    return False


def copy_images(m: Site, dest) -> list[str]:
    """The snapshot: both loop images copied (sparse) while their filesystems are frozen."""
    out = []
    for fs in (m.data, m.logs):
        dst = str(dest / ("snap-" + os.path.basename(fs.image)))
        subprocess.run(["cp", "--sparse=always", fs.image, dst], check=True)
        out.append(dst)
    return out


@MARIADB
def test_readlock_spans_the_window_and_the_restore_lacks_what_waited(any_site, tmp_path):
    """A second session's insert blocks from the quiesce to the release, then completes; the
    snapshot, restored on a second server, has every row before the quiesce and not that one."""
    m = any_site
    m.server.sql("DELETE FROM app.t; INSERT INTO app.t VALUES (1, 'before'), (2, 'before')")
    hc = m.setup("span")
    blocked: dict[str, object] = {}
    done = threading.Event()

    def insert_during_window():
        with m.connect() as c:
            c.cursor().execute("INSERT INTO t VALUES (3, 'window')")
        blocked["finished_at"] = time.monotonic()
        done.set()

    def snapshot(win):
        t = threading.Thread(target=insert_during_window)
        t.start()
        blocked["thread"] = t
        # The insert waits on the read lock (its state says so) while the filesystems are frozen.
        deadline = time.monotonic() + 10
        while not any("INSERT INTO t VALUES (3" in q for q in _waiting(m)):
            assert time.monotonic() < deadline and not done.is_set(), "the insert did not wait for the lock"
            time.sleep(0.01)
        blocked["images"] = copy_images(m, m.tmp)
        blocked["snapshot_done"] = time.monotonic()

    rep = host.run(hc, m.mount_points, snapshot=snapshot, freeze_timeout=20)
    blocked["thread"].join(30)  # a wait for the insert, which the release lets go (not a speed bound)
    assert rep.outcome == host.APP, (rep.pre, rep.post, rep.check_errors)
    assert not done.is_set() or blocked["finished_at"] >= blocked["snapshot_done"]
    assert done.is_set(), "the insert never completed after the release"
    facts = rep.pre[0].facts
    assert facts["locked"] == "FLUSH TABLES WITH READ LOCK" and facts["binlog_file"].startswith("binlog")
    assert int(facts["binlog_position"]) > 0 and facts["gtid"].startswith("0-1-")
    assert m.server.sql("SELECT id FROM app.t ORDER BY id").split() == ["1", "2", "3"]
    # Restore: the copies as a second server's disks; the engine recovers; row 3 is absent.
    data, logs = (loopfs.LoopFS(img, str(m.tmp / f"restored{i}"), "ext4", create=False)
                  for i, img in enumerate(blocked["images"]))
    try:
        with MariaDBServer(os.path.join(data.mountpoint, "db"), logdir=os.path.join(logs.mountpoint, "log"),
                           password=m.server.password, server_id=2) as r:
            assert r.sql("SELECT id FROM app.t ORDER BY id").split() == ["1", "2"]
            assert r.sql("CHECK TABLE app.t").split()[-1] == "OK"
            assert r.sql("SELECT @@GLOBAL.gtid_binlog_pos") == facts["gtid"]
    finally:
        data.close(remove_image=True)
        logs.close(remove_image=True)


def _waiting(m: Site) -> list[str]:
    return m.server.sql("SELECT COALESCE(INFO, '') FROM information_schema.PROCESSLIST "
                        "WHERE STATE LIKE '%lock%' AND INFO IS NOT NULL").splitlines()


@POSTGRESQL
def test_postgresql_checkpoint_and_backup_across_two_filesystems(any_site, tmp_path):
    """Two filesystems (data, pg_wal): CHECKPOINT, a non-exclusive backup held by the session, its
    backup_label written after the thaw; one filesystem: the checkpoint alone."""
    pg = any_site
    hc = pg.setup("two")
    rep = host.run(hc, pg.mount_points, snapshot=None, freeze_timeout=20)
    assert rep.outcome == host.APP, (rep.pre, rep.post)
    pre, post = rep.pre[0].facts, rep.post[0].facts
    assert {"checkpoint_lsn", "backup_start_lsn", "lsn"} <= pre.keys()
    label = open(post["backup_label"]).read()
    assert f"START WAL LOCATION: {pre['backup_start_lsn']} " in label and "BACKUP METHOD: streamed" in label
    assert post["backup_stop_wal_file"] == pg.server.psql(f"SELECT pg_walfile_name('{post['backup_stop_lsn']}')")
    assert os.stat(post["backup_label"]).st_mode & 0o777 == 0o600
    assert pg.server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyexec-quiesce'") == "0"
    one = host.run(pg.setup("one"), pg.mount_points[:1], snapshot=None, freeze_timeout=20)
    assert one.outcome == host.APP and "backup_start_lsn" not in one.pre[0].facts
    assert "backup_label" not in one.post[0].facts and one.pre[0].facts["checkpoint_lsn"]


def test_server_down_is_300_and_the_post_phase_holds_nothing(any_site, tmp_path):
    hc = any_site.setup("down", host=str(tmp_path / "no-such-socket"))
    if any_site.engine == "postgresql":  # PostgreSQL's host is the socket's directory
        hc = any_site.setup("down2", host=str(tmp_path))
    rep = host.run(hc, any_site.mount_points, snapshot=None, freeze_timeout=20)
    assert (rep.outcome, rep.code) == (host.FS, 300), rep.pre
    assert "cannot connect" in rep.pre[0].detail
    assert rep.post[0].ok and "nothing held" in rep.post[0].detail
    write_now(any_site, 100 + len(any_site.engine))


def test_bad_password_is_300_access_denied(any_site):
    rep = host.run(any_site.setup("badpw", password="wrong"), any_site.mount_points, freeze_timeout=20)
    assert (rep.outcome, rep.code) == (host.FS, 300)
    detail = rep.pre[0].detail
    assert ("access denied" in detail) if any_site.engine == "mariadb" else ("password authentication failed" in detail)


@pytest.mark.parametrize("mode", [0o644, 0o640, 0o700])
def test_credentials_file_with_loose_mode_is_a_306_trust_error_and_nothing_runs(any_site, mode):
    hc = any_site.setup(f"loose{mode:o}", cred_mode=mode)
    rep = host.run(hc, any_site.mount_points, freeze_timeout=20)
    assert rep.code == 306 and rep.pre == [] and rep.post == []
    assert "database credentials file" in rep.check_errors[0].detail
    res = subprocess.run([*PYEXEC, "check", "--config", hc, "--json"], capture_output=True, cwd="/")
    assert res.returncode != 0 and [p["code"] for p in orjson.loads(res.stdout)["problems"]] == [306]


@pytest.mark.parametrize("kind", ["fifo", "directory", "missing"])
def test_credentials_file_that_is_not_a_regular_file(any_site, kind):
    """A FIFO or a directory is a 306 naming the credentials file (a FIFO is never opened for reading:
    that would block the check); a missing one is 302."""
    hc = any_site.setup(f"cred-{kind}")
    cred = os.path.join(os.path.dirname(hc), "cred")
    os.unlink(cred)
    if kind == "fifo":
        os.mkfifo(cred, 0o600)
    elif kind == "directory":
        os.mkdir(cred, 0o700)
    checked = host.check(hc)
    checked.close()
    assert [e.code for e in checked.errors] == [302 if kind == "missing" else 306], checked.errors
    assert checked.errors[0].detail.startswith("database credentials file: ")


@MARIADB
def test_readlock_wait_times_out_behind_a_long_write_and_holds_nothing(any_site):
    """A long UPDATE keeps FLUSH TABLES WITH READ LOCK waiting: after lockWaitTimeoutInSeconds the
    quiesce fails 300, naming the statement it waited for, and nothing is held or waited for."""
    m = any_site
    long = long_update(m, 50, 8)
    try:
        rep = host.run(m.setup("longwait", lockWaitTimeoutInSeconds=1), m.mount_points, freeze_timeout=20)
        assert (rep.outcome, rep.code) == (host.FS, 300), rep.pre
        assert "waited lockWaitTimeoutInSeconds (1s)" in rep.pre[0].detail and "SLEEP(8)" in rep.pre[0].detail
        assert "nothing is held" in rep.pre[0].detail
        assert not any(q.startswith("FLUSH") for q in readlock_holders(m))
    finally:
        end_long_update(m, long)


@pytest.mark.parametrize("engine", ["mariadb", "postgresql"])
def test_server_dying_while_the_session_is_held_is_301(engine):
    """The server is killed inside the window: the release finds the session gone (301), the
    outcome is file-system consistent, and nothing of pyexec's is left."""
    with sandbox(engine) as m:
        rep = host.run(m.setup("dies"), m.mount_points, snapshot=lambda w: m.server.kill(), freeze_timeout=20)
        assert rep.pre[0].ok and rep.snapshot == "taken"
        assert (rep.outcome, rep.code) == (host.FS, 301), rep.post
        assert "was lost" in rep.post[0].detail


@MARIADB
def test_sigterm_while_the_lock_is_held_thaws_and_releases(any_site, tmp_path):
    """pyexec run (the CLI) gets SIGTERM while the snapshot command runs under the read lock: the
    window is thawed, UNLOCK TABLES runs in the post-phase, the exit status is 143."""
    m = any_site
    hc = m.setup("sigterm")
    marker = tmp_path / "in-window"
    proc = subprocess.Popen([*PYEXEC, "run", "--config", hc, "--mount", m.mount_points[0], "--mount",
                             m.mount_points[1], "--json", "--snapshot-cmd",
                             f"sh -c 'echo > {marker}; exec sleep 30'"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None, proc.stderr.read() if proc.poll() else ""
            time.sleep(0.02)
        assert write_waits_for_the_readlock(m)
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    doc = orjson.loads(out)
    assert proc.returncode == 128 + signal.SIGTERM and doc["interrupted"] == "SIGTERM", err
    assert doc["post"][0]["error_code"] == 0 and doc["outcome"] == "failed"
    write_now(m, 200)  # the read lock is gone: this insert does not wait


@MARIADB
def test_sigterm_while_waiting_for_the_lock_ends_the_wait(any_site, tmp_path):
    """SIGTERM while FLUSH TABLES WITH READ LOCK waits behind a long write: the wait ends at once
    (the session is KILLed), no snapshot, exit 143, and the server has no waiting FLUSH left."""
    m = any_site
    # Longer than any wait below: while it runs, the read lock cannot have been granted.
    long = long_update(m, 51, 120)
    proc = None
    try:
        hc = m.setup("sigwait", lockWaitTimeoutInSeconds=12)
        proc = subprocess.Popen([*PYEXEC, "run", "--config", hc, "--mount", m.mount_points[0], "--json"],
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd="/")
        deadline = time.monotonic() + 10
        while not any(q.startswith("FLUSH TABLES WITH READ LOCK") for q in readlock_holders(m)):
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        t0 = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=30)
        took = time.monotonic() - t0
        doc = orjson.loads(out)
        assert proc.returncode == 143 and doc["pre"][0]["cancelled"], err
        assert "interrupted" in doc["pre"][0]["detail"] and doc["snapshot"]["state"] != "taken"
        # The signal ended the wait: not the lock wait's 12 s (the step would not say cancelled) nor
        # the lock granted (the write it waited behind still runs).
        assert not doc["pre"][0]["timed_out"], doc["pre"][0]
        assert m.server.sql("SELECT ID FROM information_schema.PROCESSLIST WHERE INFO LIKE '%SLEEP(120)%' "
                            "AND INFO NOT LIKE '%PROCESSLIST%'"), "the long write ended: the wait may have"
        print(f"exited {took * 1e3:.0f} ms after SIGTERM")
        assert not any(q.startswith("FLUSH") for q in readlock_holders(m))
    finally:
        end_long_update(m, long)
        if proc is not None and proc.poll() is None:
            proc.kill()
            proc.wait()


def test_missing_driver_names_the_extra(any_site):
    """Without the client library the check fails 300 and says which extra installs it."""
    hc = any_site.setup("nodriver")
    module = "pymysql" if any_site.engine == "mariadb" else "psycopg"
    code = (f"import sys; sys.modules[{module!r}] = None\n"
            f"from pyexec.cli import main; sys.exit(main(['check', '--config', {hc!r}, '--json']))")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, cwd="/")
    doc = orjson.loads(res.stdout)
    assert res.returncode != 0 and doc["problems"][0]["code"] == 300
    assert f"pip install 'pyexec[{any_site.engine}]'" in doc["problems"][0]["detail"]


def test_a_bad_database_config_is_305_with_every_key(any_site, tmp_path):
    d = tmp_path / "bad"
    d.mkdir()
    pj = make(d / "db.json", orjson.dumps({"port": "5432", "timeoutInSeconds": 0, "host": 5}), mode=0o600)
    hc = make(d / "host.conf", (f"[pre_post]\nnumberOfPlugins = 1\npluginName0 = {any_site.engine}\n"
                                f"pluginPath0 = x\npluginConfigPath0 = {pj}\n").encode(), mode=0o600)
    checked = host.check(hc)
    assert sorted(e.key for e in checked.errors) == ["host", "port", "timeoutInSeconds"]
    assert {e.code for e in checked.errors} == {305}
    checked.close()


@MARIADB
def test_the_extension_holds_the_readlock_from_pre_script_to_post_script(any_site):
    """The Azure extension's own sequence (handle.py → PluginHost.pre_script, its snapshot with the
    filesystems frozen, post_script): the read lock is held in between and gone after."""
    from test_extension_flow import extension_backup

    from pyexec.azure import pluginhost

    m = any_site
    ph = pluginhost.PluginHost(None)
    ph.configLocation = m.setup("extension")
    seen = {}

    def snapshot(fsfreeze_on):
        seen["held_before_freeze"] = write_waits_for_the_readlock(m)
        with window.freeze(m.mount_points, timeout=20) as w:
            seen["frozen"] = [x.state for x in w.mounts]
        return seen

    try:
        out = extension_backup(ph, snapshot)
    finally:
        ph.close()
    assert (out.status, out.code) == ("app-consistent", 0), out
    assert seen == {"held_before_freeze": True, "frozen": ["frozen", "frozen"]}
    assert out.pre.scripts[0].facts["binlog_file"]
    write_now(m, 300)


@MARIADB
def test_sigkill_of_pyexec_holding_the_lock_releases_it(any_site, tmp_path):
    """Only SIGKILL skips the post-phase: then the kernel closes pyexec's socket, the server ends the
    session and its read lock, and the guardian thaws the window."""
    m = any_site
    marker = tmp_path / "in-window"
    proc = subprocess.Popen([*PYEXEC, "run", "--config", m.setup("sigkill"), "--mount", m.mount_points[0],
                             "--freeze-timeout", "3", "--json", "--snapshot-cmd",
                             f"sh -c 'echo > {marker}; exec sleep 30'"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while not marker.exists():
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.02)
        proc.kill()
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        kill_with_descendants(procs_matching(lambda argv: str(marker).encode() in b" ".join(argv)))
    # The insert waits (server-side, on the frozen disk) until the guardian thaws at the 3 s bound,
    # then must find no read lock: lock_wait_timeout 5 s would fail it with 1205.
    write_now(m, 400)
    assert not any(q.startswith("FLUSH") for q in readlock_holders(m))


@MARIADB
@pytest.mark.parametrize("privs,code,expect", [
    ("PROCESS, BINLOG MONITOR", 300, "needs the RELOAD privilege"),
    ("RELOAD", 0, "unavailable: Access denied"),
])
def test_a_user_missing_a_privilege(any_site, privs, code, expect):
    """Without RELOAD the quiesce fails 300 saying so; without BINLOG MONITOR the lock is taken and
    the report says the position was unavailable."""
    m = any_site
    user = f"u{len(privs)}"
    m.server.create_user(user, "pw-" + user, privs)
    hc = m.setup(f"priv{len(privs)}", password="pw-" + user, user=user)
    rep = host.run(hc, m.mount_points, freeze_timeout=20)
    assert rep.code == code, rep.pre
    text = rep.pre[0].detail if code else rep.pre[0].facts.get("binlog", "")
    assert expect in text, rep.pre[0]


@POSTGRESQL
def test_a_postgresql_role_without_pg_checkpoint_is_refused_clearly(any_site):
    pg = any_site
    pg.server.psql("DO $$ BEGIN CREATE ROLE plain LOGIN PASSWORD 'plain-pw'; EXCEPTION WHEN duplicate_object "
                   "THEN NULL; END $$")
    rep = host.run(pg.setup("plain", password="plain-pw", user="plain"), pg.mount_points, freeze_timeout=20)
    assert (rep.code, rep.outcome) == (300, host.FS) and "pg_checkpoint" in rep.pre[0].detail, rep.pre
    pg.server.psql("GRANT pg_checkpoint TO plain; GRANT EXECUTE ON FUNCTION pg_backup_start, pg_backup_stop TO plain")
    ok = host.run(pg.setup("granted", password="plain-pw", user="plain"), pg.mount_points, freeze_timeout=20)
    assert ok.outcome == host.APP and ok.post[0].facts["backup_label"].endswith("backup_label"), ok.pre + ok.post


@MARIADB
def test_cli_summary_shows_what_the_quiescer_recorded(any_site):
    m = any_site
    res = subprocess.run([*PYEXEC, "run", "--config", m.setup("summary"), "--mount", m.mount_points[0],
                          "--mount", m.mount_points[1]], capture_output=True, text=True, cwd="/", timeout=60)
    assert res.returncode == 0 and "outcome: app-consistent" in res.stdout, res.stdout + res.stderr
    assert "pre-script mariadb: ok" in res.stdout and "binlog_file=binlog." in res.stdout
    assert "post-script mariadb: ok" in res.stdout and "Traceback" not in res.stderr
