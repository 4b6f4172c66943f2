"""The built-in database quiescers on real servers, against the same flow done by shell pre/post-scripts
(the ScriptRunner plugin calling psql / mysql) and against a freeze with no plugin at all:

1. what each adds before the window (pre-phase), inside it (the window's length) and after it (the
   post-phase, the release), with the server's data and its WAL/binlog on two loop filesystems;
2. what a load feels: pgbench (PostgreSQL) or Python client threads (MariaDB) logging every
   transaction's latency to a file off the frozen disks, while a snapshot is taken by each way, and
   with no snapshot at all: p99 latency and the longest stall;
3. as an asserted fact: a shell pre-script's FLUSH TABLES WITH READ LOCK is gone when the window
   opens (its session ended with the client), while the built-in quiescer's is held in it.

Each benchmark stores its measurements in `extra_info` (ns, like benchmarks/test_bench_flow.py);
benchmarks/report.py prints the "databases" tables from them.  With --benchmark-disable (`make test`)
every benchmark runs once, quickly, and still asserts what it measures."""
from __future__ import annotations

import array
import glob
import os
import pathlib
import shutil
import subprocess
import sys
import time

import orjson
import pymysql
import pytest
from helpers import Mounts, db_sandbox, needs_root
from report import pct

from pyexec import host
from pyexec.demo.servers import MariaDBServer, PostgresServer

pytestmark = needs_root

ENGINES = ["postgresql", "mariadb"]
WAYS = ["builtin", "script", "none"]  # the built-in quiescer, shell scripts, no plugin (freeze only)
BACKUP_PRIVS = "RELOAD, PROCESS, BINLOG MONITOR, CONNECTION ADMIN"  # what the quiescer needs (tests/test_quiesce.py)
ER_LOCK_WAIT_TIMEOUT = 1205
PGBENCH_SCALE = 4  # one branch row per client: TPC-B's updates of pgbench_branches do not serialise the clients
CLIENTS = 4


def _put(path: pathlib.Path, data: bytes, mode: int) -> str:
    """A root-owned file of the given mode (what pyexec's trust rules ask of configs and scripts)."""
    path.write_bytes(data)
    os.chown(path, 0, 0)
    os.chmod(path, mode)
    return str(path)


class DbSite:
    """A server on two loop filesystems (data; WAL, or binlog + InnoDB redo), the three host configs
    that snapshot it, and a directory off the frozen disks for the load's latency logs."""

    def __init__(self, engine: str, tmp: pathlib.Path, mounts: Mounts):
        self.engine, self.tmp, self.mounts = engine, tmp, mounts
        # Room for pgbench's tables at PGBENCH_SCALE and for max_wal_size (64 MB) plus the segments
        # a checkpoint has not recycled yet; the images are sparse.
        self.data = mounts.make("ext4", 384)
        self.logs = mounts.make("ext4", 256)
        self.mount_points = [self.data.mountpoint, self.logs.mountpoint]
        self.server: PostgresServer | MariaDBServer
        if engine == "postgresql":
            self.server = PostgresServer(os.path.join(self.data.mountpoint, "db"),
                                         waldir=os.path.join(self.logs.mountpoint, "wal"))
        else:
            self.server = MariaDBServer(os.path.join(self.data.mountpoint, "db"),
                                        logdir=os.path.join(self.logs.mountpoint, "log"))
        self.server.start()
        self.configs = {way: self._write_config(way) for way in WAYS}

    # ---- the three ways of snapshotting it -------------------------------------------------------

    def _write_config(self, way: str) -> str:
        d = self.tmp / f"etc-{way}"
        d.mkdir()
        os.chmod(d, 0o700)
        s = self.server
        if way == "none":
            return _put(d / "host.conf", b"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 0\n", 0o600)
        if isinstance(s, MariaDBServer):
            user, password = "bk", "bk-secret"
            if way == "builtin":  # created once, for both ways
                s.create_user(user, password, BACKUP_PRIVS)
        else:
            user, password = "postgres", s.password
        if way == "builtin":
            cred = _put(d / "cred", (password + "\n").encode(), 0o600)
            doc: dict[str, object] = {"host": s.socket_path if isinstance(s, MariaDBServer) else str(s.sockdir),
                                      "user": user, "credentialsFile": cred, "timeoutInSeconds": 30}
            if isinstance(s, MariaDBServer):
                doc["lockWaitTimeoutInSeconds"] = 10
            else:
                doc["port"] = s.port
                doc["backupLabelDirectory"] = str(d / "labels")
            conf = _put(d / "db.json", orjson.dumps(doc), 0o600)
            name, path = self.engine, "builtin"
        else:
            pre, post = self._scripts(d, user, password)
            doc = {"pluginName": "ScriptRunner", "preScriptLocation": pre, "postScriptLocation": post,
                   "preScriptParams": [], "postScriptParams": [], "preScriptNoOfRetries": 0,
                   "postScriptNoOfRetries": 0, "timeoutInSeconds": 30, "continueBackupOnFailure": True,
                   "fsFreezeEnabled": True}
            conf = _put(d / "plugin.json", orjson.dumps(doc), 0o600)
            name, path = "ScriptRunner", str(d)
        return _put(d / "host.conf", (f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 1\n"
                                      f"pluginName0 = {name}\npluginPath0 = {path}\n"
                                      f"pluginConfigPath0 = {conf}\n").encode(), 0o600)

    def _scripts(self, d: pathlib.Path, user: str, password: str) -> tuple[str, str]:
        """The pre/post-scripts people write for the reference: the client's CLI, one statement each.
        PostgreSQL 15 has no exclusive backup (pg_start_backup's session-less mode is gone), so a
        script can only checkpoint, and its post-script has nothing to release."""
        s = self.server
        if isinstance(s, PostgresServer):
            passfile = _put(d / "pgpass", f"*:*:*:{user}:{password}\n".encode(), 0o600)
            psql = (f"PGPASSFILE={passfile} exec {s.bin['psql']} -X -q -v ON_ERROR_STOP=1 -h {s.sockdir} "
                    f"-p {s.port} -U {user} -d postgres")
            pre = f"#!/bin/sh\n{psql} -c CHECKPOINT\n"
            post = "#!/bin/sh\nexit 0\n"
        else:
            cnf = _put(d / "client.cnf", f"[client]\nsocket = {s.socket_path}\nuser = {user}\n"
                                         f"password = {password}\n".encode(), 0o600)
            mysql = f"exec {shutil.which('mysql') or s.bin['mariadb']} --defaults-file={cnf}"
            # The lock lives as long as the client's session: it is released when mysql exits.
            pre = f'#!/bin/sh\n{mysql} -e "FLUSH TABLES WITH READ LOCK"\n'
            post = f'#!/bin/sh\n{mysql} -e "UNLOCK TABLES"\n'
        return _put(d / "pre.sh", pre.encode(), 0o700), _put(d / "post.sh", post.encode(), 0o700)

    def run(self, way: str, snapshot=None) -> host.RunReport:
        """One pyexec run of this way over both filesystems; asserts it took the snapshot as it should."""
        self.mounts.rearm()
        rep = host.run(self.configs[way], mount_points=self.mount_points, snapshot=snapshot, freeze_timeout=30)
        want = host.FS if way == "none" else host.APP
        assert (rep.outcome, rep.snapshot) == (want, "taken"), (rep.code, rep.pre, rep.post, rep.check_errors)
        assert len(rep.window.mounts) == 2
        return rep

    # ---- SQL ----------------------------------------------------------------------------------------

    def mysql(self, **kw) -> pymysql.Connection:
        assert isinstance(self.server, MariaDBServer)
        return pymysql.connect(**self.server.connect_args(), autocommit=True, **kw)

    def sql(self, statement: str) -> str:
        s = self.server
        return s.sql(statement) if isinstance(s, MariaDBServer) else s.psql(statement)

    def close(self) -> None:
        self.server.stop()


@pytest.fixture(scope="module", params=ENGINES)
def site(request):
    """One server per engine for the module, in a directory its OS user can reach (pytest's tmp dirs
    are 0700); afterwards no server, mount or loop device of it is left."""
    with db_sandbox(f"pyexec-bdb-{request.param}-",
                    lambda tmp, mounts: DbSite(request.param, tmp, mounts)) as s:
        yield s


# ---- 1. the phases: pre (quiesce), window, post (release) --------------------------------------------

def _dirty(site: DbSite, n: int) -> None:
    """n committed rows since the last round: something for a checkpoint or a flush to write."""
    if site.engine == "postgresql":
        site.sql(f"CREATE TABLE IF NOT EXISTS churn (id serial PRIMARY KEY, v text); "
                 f"INSERT INTO churn (v) SELECT md5(g::text) FROM generate_series(1, {n}) g")
    else:
        site.sql(f"CREATE DATABASE IF NOT EXISTS app; CREATE TABLE IF NOT EXISTS app.churn "
                 f"(id INT AUTO_INCREMENT PRIMARY KEY, v CHAR(32)) ENGINE=InnoDB; "
                 f"INSERT INTO app.churn (v) SELECT MD5(seq) FROM app.seq_1_to_{n}")


PROBE_TABLE = "app.gl_probe"  # a MEMORY table: no file on the frozen disks is written to insert into it


def readlock_held_in_window(site: DbSite) -> bool:
    """From a session of its own, inside the window: True if the global read lock is held.

    An insert into a MEMORY table with the binlog off for the session (sql_log_bin = 0) writes to no
    file, so it cannot block on the frozen filesystems; it can only wait on the global read lock
    (MDL BACKUP_DML against FTWRL's), and lock_wait_timeout = 1 ends that wait with
    ER_LOCK_WAIT_TIMEOUT (1205).  read_timeout bounds the client should it hang anyway."""
    c = site.mysql(read_timeout=10)
    try:
        with c.cursor() as cur:
            cur.execute("SET SESSION sql_log_bin = 0")
            cur.execute("SET SESSION lock_wait_timeout = 1")
            try:
                cur.execute(f"INSERT INTO {PROBE_TABLE} VALUES (CONNECTION_ID())")
            except pymysql.err.OperationalError as e:
                assert e.args[0] == ER_LOCK_WAIT_TIMEOUT, e
                return True
        return False
    finally:
        c.close()


def _check_readlock(site: DbSite, way: str) -> bool:
    """One run whose snapshot checks the read lock from another session, inside the window."""
    site.sql(f"CREATE DATABASE IF NOT EXISTS app; CREATE TABLE IF NOT EXISTS {PROBE_TABLE} (id BIGINT) ENGINE=MEMORY")
    seen: dict[str, object] = {}

    def snapshot(win):
        t0 = time.monotonic()
        seen["held"] = readlock_held_in_window(site)
        seen["took"] = time.monotonic() - t0

    site.run(way, snapshot)
    held = bool(seen["held"])
    # The built-in quiescer's lock makes the probe wait out its lock_wait_timeout; without one it does not wait.
    assert held == (way == "builtin"), f"{way}: read lock held in the window: {held}"
    assert (seen["took"] >= 0.9) == held and seen["took"] < 5, seen
    return held


@pytest.mark.benchmark(group="database quiescers: phases, idle server, 2 ext4")
@pytest.mark.parametrize("way", WAYS)
def test_db_phases(benchmark, site, way):
    """pyexec run over the server's two filesystems with a no-op snapshot, each round after 2,000 new
    rows: the pre-phase, the window (first FIFREEZE to last FITHAW) and the post-phase."""
    facts: dict[str, object] = {}
    if site.engine == "mariadb" and way != "none":
        facts["readlock_in_window"] = _check_readlock(site, way)
    reps: list[host.RunReport] = []

    def once():
        reps.append(site.run(way))

    benchmark.pedantic(once, setup=lambda: _dirty(site, 2000), rounds=1 if benchmark.disabled else 15)
    for rep in reps:
        if way == "builtin" and site.engine == "postgresql":
            # Two filesystems: the checkpoint, then a backup held across the window, its label written after.
            assert {"checkpoint_lsn", "backup_start_lsn"} <= rep.pre[0].facts.keys()
            assert os.path.exists(rep.post[0].facts["backup_label"])
        elif way == "builtin":
            assert rep.pre[0].facts["locked"] == "FLUSH TABLES WITH READ LOCK"
    benchmark.extra_info.update({
        "engine": site.engine, "way": way, **facts,
        "pre_ns": [r.phases_ns.get("pre", 0) for r in reps],
        "post_ns": [r.phases_ns.get("post", 0) for r in reps],
        "window_ns": [r.window.length_ns for r in reps],
    })


# ---- 2. what a load feels ----------------------------------------------------------------------------

MARIADB_LOAD = r"""
import array, json, sys, threading, time
import pymysql
with open(sys.argv[1]) as f:
    cfg = json.load(f)
conns = [pymysql.connect(**cfg["connect"], database="app", autocommit=False) for _ in range(cfg["clients"])]
out = [array.array("q") for _ in conns]
start = threading.Barrier(len(conns) + 1)
now = time.monotonic_ns

def client(i):
    c, log = conns[i], out[i]
    cur = c.cursor()
    start.wait()
    end = now() + int(cfg["seconds"] * 1e9)
    n = 0
    while True:
        t0 = now()
        if t0 >= end:
            return
        cur.execute("INSERT INTO app.load (client, n) VALUES (%s, %s)", (i, n))
        cur.execute("UPDATE app.counters SET n = n + 1 WHERE id = %s", (i,))
        c.commit()
        log.extend((t0, now() - t0))
        n += 1

threads = [threading.Thread(target=client, args=(i,)) for i in range(len(conns))]
for t in threads:
    t.start()
start.wait()
print("started", flush=True)
for t in threads:
    t.join()
with open(cfg["out"], "wb") as f:
    for log in out:
        log.tofile(f)
"""


class Load:
    """A load of CLIENTS clients for `seconds`, each logging every transaction's latency (to a file
    in site.tmp, off the frozen disks); `latencies_us()` once it has ended."""

    def __init__(self, site: DbSite, seconds: float, tag: str):
        self.site, self.tag = site, tag
        s = site.server
        self.out = site.tmp / f"lat-{tag}"
        if isinstance(s, PostgresServer):
            env = {"PATH": "/usr/bin:/bin", "PGPASSWORD": s.password, "LC_ALL": "C"}
            self.proc = subprocess.Popen(
                [s.bin["pgbench"], "-h", str(s.sockdir), "-p", str(s.port), "-U", "postgres", "-n",
                 "-c", str(CLIENTS), "-j", "2", "-T", str(int(seconds)), "--log", f"--log-prefix={self.out}",
                 "postgres"], env=env, cwd=str(site.tmp), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            self.started = time.monotonic()
        else:
            cfg = {"connect": s.connect_args(), "clients": CLIENTS, "seconds": seconds, "out": str(self.out)}
            # The password goes in a root-only file, not on a command line anyone can read in /proc.
            cfg_path = _put(site.tmp / f"load-{tag}.json", orjson.dumps(cfg), 0o600)
            self.proc = subprocess.Popen([sys.executable, "-c", MARIADB_LOAD, cfg_path], stdin=subprocess.DEVNULL,
                                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
            line = self.proc.stdout.readline()  # the clients have connected and start now
            assert line == "started\n", line + self.proc.stderr.read()
            self.started = time.monotonic()

    def running(self) -> bool:
        return self.proc.poll() is None

    def wait(self) -> list[int]:
        """Each transaction's latency (µs), in no particular order, once the load has ended."""
        out, err = self.proc.communicate(timeout=120)
        assert self.proc.returncode == 0, (out or "")[-2000:] + err[-2000:]
        if self.site.engine == "postgresql":
            lat = []
            for path in glob.glob(f"{self.out}.*"):
                with open(path) as f:
                    # client_id transaction_no time script_no time_epoch time_us (pgbench(1), "Per-Transaction Logging")
                    lat += [int(ln.split()[2]) for ln in f]
                os.unlink(path)
            return lat
        a = array.array("q")
        with open(self.out, "rb") as f:
            a.frombytes(f.read())
        os.unlink(self.out)
        return [ns // 1000 for ns in a[1::2]]

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def _prepare_load(site: DbSite) -> None:
    if site.engine == "postgresql":
        s = site.server
        assert isinstance(s, PostgresServer)
        res = subprocess.run([s.bin["pgbench"], "-i", "-q", "-s", str(PGBENCH_SCALE), "-h", str(s.sockdir),
                              "-p", str(s.port), "-U", "postgres", "postgres"],
                             env={"PATH": "/usr/bin:/bin", "PGPASSWORD": s.password, "LC_ALL": "C"},
                             capture_output=True, text=True, timeout=300, cwd="/")
        assert res.returncode == 0, res.stderr
        site.sql("CHECKPOINT")
    else:
        site.sql("CREATE DATABASE IF NOT EXISTS app; "
                 "CREATE TABLE IF NOT EXISTS app.load (id BIGINT AUTO_INCREMENT PRIMARY KEY, client INT, n INT, "
                 "at TIMESTAMP(6) DEFAULT CURRENT_TIMESTAMP(6)) ENGINE=InnoDB; "
                 "CREATE TABLE IF NOT EXISTS app.counters (id INT PRIMARY KEY, n BIGINT) ENGINE=InnoDB; "
                 f"INSERT IGNORE INTO app.counters SELECT seq, 0 FROM app.seq_0_to_{CLIENTS - 1}")


LOAD_CASES = ["builtin", "script", "none", "no snapshot"]  # "none": the freeze with no plugin


@pytest.mark.benchmark(group="database quiescers: latency under load, 2 ext4")
def test_db_load(benchmark, site):
    """Rounds in which each case takes its turn (each goes first as often, so the machine's drift
    falls on all alike): a load of CLIENTS clients, and a snapshot 1 s into it by the built-in
    quiescer, the shell scripts, a freeze with no plugin, or none at all.  Per case: every
    transaction's latency (p99 over all rounds) and the longest one (the stall)."""
    _prepare_load(site)
    rounds, seconds = (1, 3) if benchmark.disabled else (3, 5)
    stats: dict[str, dict[str, list]] = {c: {"lat_us": [], "max_us": [], "window_ns": [], "pre_ns": [],
                                              "post_ns": [], "txns": []} for c in LOAD_CASES}

    def one(case: str, i: int) -> None:
        load = Load(site, seconds, f"{i}-{case.replace(' ', '_')}")
        try:
            time.sleep(max(0.0, load.started + 1.0 - time.monotonic()))
            assert load.running(), "the load ended before the snapshot"
            if case != "no snapshot":
                rep = site.run(case)
                # The snapshot fell inside the load: it was still running when the post-phase ended.
                assert load.running(), f"{case}: the run outlasted the load ({sum(rep.phases_ns.values()) / 1e9:.1f}s)"
                st = stats[case]
                st["window_ns"].append(rep.window.length_ns)
                st["pre_ns"].append(rep.phases_ns.get("pre", 0))
                st["post_ns"].append(rep.phases_ns.get("post", 0))
            lat = load.wait()
        finally:
            load.kill()
        assert len(lat) > 20 * seconds, f"{case}: only {len(lat)} transactions in {seconds}s"
        stats[case]["lat_us"] += lat
        stats[case]["max_us"].append(max(lat))
        stats[case]["txns"].append(len(lat))

    def run_all():
        for i in range(rounds):
            order = LOAD_CASES[i % len(LOAD_CASES):] + LOAD_CASES[:i % len(LOAD_CASES)]
            for case in order:
                site.mounts.rearm()
                one(case, i)

    benchmark.pedantic(run_all, rounds=1, iterations=1)
    out = {}
    for case, st in stats.items():
        lat = st.pop("lat_us")
        out[case] = {**st, "p50_us": pct(lat, 0.5), "p99_us": pct(lat, 0.99), "max_stall_us": max(lat),
                     "seconds": seconds}
    benchmark.extra_info.update({"engine": site.engine, "clients": CLIENTS, "cases": out})
