"""`pyexec demo --db postgresql|mariadb`: end to end with --compare and --json (a quiesced and an
unquiesced round on a loaded server, each restored on a second server and checked; PostgreSQL's
quiesced round restored a second time from its backup_label and WAL archive), and nothing left
behind: no server process, mount, loop device, run directory or sandbox file; bad input and a missing
server binary end cleanly."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time

import orjson
import pytest
from helpers import db_procs_under, needs_btrfs, needs_root, needs_xfs

# `make test` installs both servers (scripts/setup.sh): a missing one fails its tests, never skips them.
ENGINES = ["postgresql", "mariadb"]
PYEXEC = [sys.executable, "-m", "pyexec.cli"]

def _assert_nothing_left(base: str, doc: dict | None = None) -> None:
    assert db_procs_under(base) == []
    assert base not in open("/proc/self/mountinfo").read()
    loops = subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout
    assert base not in loops
    assert os.listdir(base) == []
    for d in (doc or {}).get("run_dirs", []):
        assert not os.path.exists(d), d


@pytest.fixture
def base():
    """A sandbox parent the servers' OS users can reach (pytest's tmp_path is 0700)."""
    with tempfile.TemporaryDirectory(prefix="pyexec-dbdemo-test-") as d:
        os.chmod(d, 0o711)
        yield d


@needs_root
@needs_xfs
@needs_btrfs
@pytest.mark.parametrize("engine", ENGINES)
def test_db_demo_compare_json(engine, base, tmp_path):
    """One quiesced and one unquiesced round under load, each restored and verified; --json is the
    one document on stdout, also written to --report; nothing is left behind."""
    t0 = time.monotonic()
    r = subprocess.run([*PYEXEC, "demo", "--db", engine, "--compare", "--json", "--dir", base,
                        "--report", str(tmp_path / "report.json")],
                       capture_output=True, text=True, cwd=tmp_path, timeout=300)
    took = time.monotonic() - t0
    assert r.returncode == 0, r.stdout[-4000:] + r.stderr[-4000:]
    assert "Traceback" not in r.stderr
    doc = orjson.loads(r.stdout)
    assert orjson.loads((tmp_path / "report.json").read_bytes()) == doc
    assert doc["ok"] and doc["db"] == engine
    q, u = doc["rounds"]
    assert (q["mode"], u["mode"]) == ("quiesced", "unquiesced")
    assert q["report"]["outcome"] == "app-consistent" and u["report"]["outcome"] == "file-system-consistent"
    assert u["report"]["pre"] == [] and any("nothing was quiesced" in w for w in u["report"]["warnings"])
    for rnd in (q, u):
        assert rnd["verified"] and all(rnd["checks"].values()), rnd["checks"]
        rs = rnd["restore"]
        assert rs["startup"]["recovered"], rs["startup"]  # a snapshot of a live server: crash recovery ran
        lg = rs["ledger"]
        assert lg["rows_written"] > 0 and lg["rows_restored"] > 0
        assert lg["missing_acked_before_log_freeze"] == 0 and lg["present_sent_after_log_frozen"] == 0
        assert lg["acked_before_log_freeze"] > 0 and lg["sent_after_log_frozen"] > 0  # the load ran across it
        assert rnd["load"]["transactions"] and not rnd["load"]["errors"]
    qc = q["checks"]
    if engine == "postgresql":
        assert qc["backup_label START WAL LOCATION = backup_start_lsn"]
        assert q["restore"]["backup_label_start_wal_location"] == q["report"]["pre"][0]["facts"]["backup_start_lsn"]
        assert qc["recovery starts at or after the quiesce's checkpoint"]
        for rnd in (q, u):
            p = rnd["restore"]["pgbench"]
            assert rnd["restore"]["pg_amcheck"]["exit_code"] == 0
            assert p["sum_abalance"] == p["sum_tbalance"] == p["sum_bbalance"] == p["sum_delta"]
        # The same snapshot restored again with the quiescer's backup_label and the WAL archive.
        lr, facts = q["label_restore"], q["report"]["post"][0]["facts"]
        assert lr["verified"] and lr["startup"]["archive_recovery"] and lr["startup"]["promoted"], lr
        assert lr["startup"]["consistent_at"] == facts["backup_stop_lsn"] == lr["backup_stop_lsn"]
        assert lr["startup"]["redo_start"] == q["report"]["pre"][0]["facts"]["backup_start_lsn"]
        assert lr["backup_label"] == facts["backup_label"] and lr["pg_amcheck"]["exit_code"] == 0
        lg = lr["ledger"]
        assert lg["missing_acked_before_release"] == 0 and lg["present_sent_after_release"] == 0
        assert lg["acked_before_release"] > 0 and lg["sent_after_release"] > 0
        assert "label_restore" not in u and "label restore: consistent at LSN" in r.stderr
    else:
        assert qc["restored @@gtid_binlog_pos = the GTID recorded at the quiesce"]
        assert q["restore"]["gtid_binlog_pos"] == q["report"]["pre"][0]["facts"]["gtid"]
        lg = q["restore"]["ledger"]
        assert lg["committed_while_locked"] == 0 and lg["acked_before_release"] == lg["rows_restored"]
        for rnd in (q, u):
            c = rnd["restore"]["check_table"]
            assert c["ok"] == c["tables"] > 0 and not c["not_ok"]
    cmp = doc["compare"]
    assert cmp["quiesced"]["outcome"] == "app-consistent" and cmp["unquiesced"]["outcome"] == "file-system-consistent"
    assert "side by side" in r.stderr and "application-consistent and file-system-consistent" in r.stderr
    _assert_nothing_left(base, doc)
    assert list(tmp_path.iterdir()) == [tmp_path / "report.json"]
    print(f"{engine}: {took:.1f}s")


def test_db_demo_bad_input_is_an_argparse_error():
    for argv in (["--db", "oracle"], ["--compare"], ["--db", "mariadb", "--compare", "--no-quiesce"],
                 ["--db", "mariadb", "--rounds", "0"]):
        r = subprocess.run([*PYEXEC, "demo", *argv], capture_output=True, text=True, cwd="/", timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, (argv, r.stderr)
        assert "usage: pyexec demo" in r.stderr and r.stdout == ""
    assert "invalid choice: 'oracle'" in subprocess.run([*PYEXEC, "demo", "--db", "oracle"], capture_output=True,
                                                        text=True, cwd="/").stderr


HIDE = """
import os, shutil, sys
tool = sys.argv[1]
real_access, real_which = os.access, shutil.which
os.access = lambda p, m, *a, **k: False if os.path.basename(str(p)) == tool else real_access(p, m, *a, **k)
shutil.which = lambda n, *a, **k: None if os.path.basename(n) == tool else real_which(n, *a, **k)
from pyexec.cli import main
sys.exit(main(sys.argv[2:]))
"""


@needs_root
@pytest.mark.parametrize("engine,tool", [("postgresql", "pgbench"), ("mariadb", "mariadbd")])
def test_db_demo_missing_server_binary_names_setup(engine, tool, base):
    r = subprocess.run([sys.executable, "-c", HIDE, tool, "demo", "--db", engine, "--json", "--dir", base],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
    assert tool in r.stderr and "scripts/setup.sh" in r.stderr
    doc = orjson.loads(r.stdout)
    assert not doc["ok"] and "scripts/setup.sh" in doc["error"]
    assert os.listdir(base) == []


@needs_root
@needs_xfs
@needs_btrfs
@pytest.mark.parametrize("engine", ENGINES[1:])
def test_db_demo_sigterm_mid_round_leaves_nothing(engine, base):
    """SIGTERM while the load runs: the demo stops its servers, load and mounts, prints its one JSON
    document (interrupted) and exits 1."""
    proc = subprocess.Popen([*PYEXEC, "demo", "--db", engine, "--json", "--dir", base],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd="/")
    err = []
    try:
        assert proc.stderr is not None
        for line in proc.stderr:
            err.append(line)
            if "round 1 (quiesced)" in line:
                break
        time.sleep(0.5)
        proc.send_signal(signal.SIGTERM)
        out, rest = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    err.append(rest)
    assert proc.returncode == 1, "".join(err)
    assert "Traceback" not in "".join(err)
    doc = orjson.loads(out)
    assert doc["error"] == "interrupted" and not doc["ok"]
    _assert_nothing_left(base, doc)
