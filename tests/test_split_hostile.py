"""Issue 19, attack 5 and two lower items, on real parts: a built-in quiescer's phases split across
`pluginhost pre` and `pluginhost post` processes (real MariaDB and PostgreSQL servers), a snapshot
command found on root's PATH in a directory a real unprivileged user owns, and the demo's servers and
report against symlinks planted by the account that owns the directories they write into."""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import stat
import subprocess
import sys
import tempfile

import orjson
import pytest
from helpers import IS_ROOT
from test_config_trust import make, write_setup
from test_quiesce import sandbox, write_now

from pyexec import errors
from pyexec.demo import loopfs, output, pgserver, safeio, servers

pytestmark = pytest.mark.skipif(not IS_ROOT, reason="needs root: servers, loop mounts, useradd")
PYEXEC = [sys.executable, "-m", "pyexec.cli"]
PLUGINHOST = os.path.join(os.path.dirname(sys.executable), "pluginhost")


# ------------------------------------------------------------------ a phase split across processes

@pytest.fixture(scope="module", params=["mariadb", "postgresql"])
def site(request):
    with sandbox(request.param) as s:
        yield s


def quiescer_sessions(site) -> int:
    """How many sessions the quiescer's user has open on the server (a held lock or backup is one)."""
    if site.engine == "mariadb":
        return int(site.server.sql(f"SELECT COUNT(*) FROM information_schema.PROCESSLIST WHERE USER = '{site.user}'"))
    return int(site.server.psql("SELECT count(*) FROM pg_stat_activity WHERE application_name = 'pyexec-quiesce'"))


def pluginhost(hc: str, *argv: str) -> subprocess.CompletedProcess:
    res = subprocess.run([PLUGINHOST, "--config", hc, *argv], capture_output=True, text=True, cwd="/", timeout=120)
    assert "Traceback" not in res.stderr, res.stderr
    return res


def test_pluginhost_pre_and_post_as_separate_processes_refuse_a_quiescer(site):
    """`pre` exiting 0 would claim a quiesce whose session ends with the process, before the freeze
    (MariaDB's read lock, PostgreSQL's backup).  Both verbs refuse, before anything connects; the
    same config in one process (`pyexec run`) holds its session and, on PostgreSQL over two
    filesystems, writes the backup_label."""
    site.mounts.rearm()
    hc = site.setup("split")
    labels = pathlib.Path(hc).parent / "labels"
    entry = errors.TABLE[319]
    for verb in (["pre"], ["pre", "--json"], ["post", "--snapshot", "taken"]):
        res = pluginhost(hc, *verb)
        assert res.returncode == entry.exit_status != 0, (verb, res.stdout, res.stderr)
        assert f"319  {entry.name}" in res.stderr and "pyexec run" in res.stderr and site.engine in res.stderr
        assert "Final Error Code :- 0" not in res.stdout and "nothing held" not in res.stdout + res.stderr
        assert quiescer_sessions(site) == 0, "the refusal comes before any connection"
    write_now(site, 1900)  # nothing held: a write goes straight through
    assert not labels.exists(), "no backup was started or stopped"
    one = subprocess.run([*PYEXEC, "run", "--config", hc, "--json", "--freeze-timeout", "20",
                          *(a for m in site.mount_points for a in ("--mount", m)), "--snapshot-cmd", "true"],
                         capture_output=True, cwd="/", timeout=120)
    doc = orjson.loads(one.stdout)
    assert one.returncode == 0 and doc["outcome"] == "app-consistent", one.stderr
    if site.engine == "postgresql":
        label = pathlib.Path(doc["post"][0]["facts"]["backup_label"])
        assert label.parent.parent == labels and "START WAL LOCATION:" in label.read_text()
    else:
        assert doc["pre"][0]["facts"]["binlog_file"]
    assert not any(loopfs.thaw_path(m) for m in site.mount_points)


def test_a_script_plugin_beside_a_quiescer_does_not_run_in_a_split_pre(site, tmp_path):
    """The refusal is the whole verb's, before any plugin runs: a script plugin beside the quiescer does
    not quiesce its application for a backup whose other half cannot be held."""
    hc = site.setup("mixed")
    db_json = next(ln.split("=", 1)[1].strip() for ln in open(hc) if ln.startswith("pluginConfigPath0"))
    ran = tmp_path / "script-ran"
    scripts_hc = write_setup(tmp_path, pre=f"#!/bin/sh\necho pre > {ran}\n".encode())
    script_json = next(ln.split("=", 1)[1].strip() for ln in open(scripts_hc) if ln.startswith("pluginConfigPath0"))
    both = make(tmp_path / "etc" / "both.conf", (
        f"[pre_post]\ntimeoutInSeconds = 60\nnumberOfPlugins = 2\n"
        f"pluginName0 = ScriptRunner0\npluginPath0 = {tmp_path / 'etc'}\npluginConfigPath0 = {script_json}\n"
        f"pluginName1 = {site.engine}\npluginPath1 = builtin\npluginConfigPath1 = {db_json}\n").encode(), mode=0o600)
    res = pluginhost(both, "pre")
    assert res.returncode != 0 and "319" in res.stderr
    assert not ran.exists(), "no pre-script ran"
    assert quiescer_sessions(site) == 0
    # Scripts alone stay stateless and work phase by phase.
    res = pluginhost(scripts_hc, "pre")
    assert res.returncode == 0 and ran.read_text() == "pre\n", res.stderr


# ------------------------------------------------------------------ the snapshot command's program

class Area:
    """Directories the user can reach (pytest's tmp_path cannot be: /tmp/pytest-of-root is 700):
    `root` (root's, 755), `user` (the user's own) and `marks` (anyone may write: where a program
    leaves its mark if it runs)."""

    def __init__(self, user):
        self.base = pathlib.Path(tempfile.mkdtemp(prefix="pyexec-split-"))
        os.chmod(self.base, 0o755)
        self.root = self.base / "root"
        self.root.mkdir(mode=0o755)
        self.user = self.base / "user"
        self.user.mkdir(mode=0o755)
        user.chown(self.user)
        self.marks = self.base / "marks"
        self.marks.mkdir()
        os.chmod(self.marks, 0o1777)


@pytest.fixture
def area(local_user):
    a = Area(local_user)
    try:
        yield a
    finally:
        shutil.rmtree(a.base)


def _users_program(user, directory: pathlib.Path, name: str, marker: pathlib.Path) -> pathlib.Path:
    """The user's own program at directory/name (made by the user's processes), leaving marker if run."""
    prog = directory / name
    res = user.run(["sh", "-c", (f"mkdir -p '{directory}' && printf '#!/bin/sh\\nid -u > {marker}\\n' > '{prog}' "
                                 f"&& chmod 755 '{prog}'")])
    assert res.returncode == 0, res.stderr
    return prog


def test_snapshot_command_on_a_users_path_directory_is_refused(tmp_path, mounts, local_user, area):
    """A directory of the user's early in root's PATH, holding a `cp`: refused as a bad argument (11)
    before anything runs; the user's program never runs as root, nothing is frozen."""
    m = mounts.make("ext4")
    pre_ran = tmp_path / "pre-ran"
    hc = write_setup(tmp_path, pre=f"#!/bin/sh\necho > {pre_ran}\n".encode())
    marker = area.marks / "ran"
    bindir = area.user / "bin"
    _users_program(local_user, bindir, "cp", marker)
    env = {**os.environ, "PATH": f"{bindir}:/usr/bin:/bin"}
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json",
                          "--snapshot-cmd", f"cp {hc} {tmp_path / 'copy'}"],
                         capture_output=True, text=True, cwd="/", env=env, timeout=120)
    assert "Traceback" not in res.stderr
    doc = orjson.loads(res.stdout)
    assert res.returncode == errors.TABLE[11].exit_status and doc["code"] == 11, res.stdout
    detail = " ".join(p["detail"] for p in doc["problems"])
    assert f"{bindir}/cp" in detail and f"owned by uid {local_user.uid}" in detail, detail
    assert not marker.exists() and not pre_ran.exists() and not (tmp_path / "copy").exists()
    assert not loopfs.thaw_path(m.mountpoint)
    # A PATH without the user's directory finds the system's cp, which runs.
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json",
                          "--snapshot-cmd", f"cp {hc} {tmp_path / 'copy'}"],
                         capture_output=True, text=True, cwd="/", env={**env, "PATH": "/usr/bin:/bin"},
                         timeout=120)
    assert orjson.loads(res.stdout)["outcome"] == "app-consistent", res.stdout
    assert (tmp_path / "copy").exists() and not marker.exists()


def test_snapshot_command_given_to_a_user_after_the_check_does_not_run(tmp_path, mounts, local_user, area):
    """Checked when resolved, walked again right before the spawn: a directory handed to the user
    during the pre-scripts, the user's program put in place of root's, is not run."""
    m = mounts.make("ext4")
    d = area.root / "bin"
    d.mkdir(mode=0o755)
    roots_ran, users_ran = area.marks / "roots-ran", area.marks / "users-ran"
    snap = pathlib.Path(make(d / "snap", f"#!/bin/sh\necho > {roots_ran}\n".encode(), mode=0o755))
    evil = _users_program(local_user, area.user / "evil", "snap", users_ran)
    # The pre-script (root) hands the directory over; the user's own process swaps the program.
    swap = shlex.join(local_user.argv(["sh", "-c", f"cp '{evil}' '{d}/new' && mv -f '{d}/new' '{snap}'"]))
    hc = write_setup(tmp_path, pre=f"#!/bin/sh\nchown {local_user.uid} {d} && {swap}\n".encode())
    res = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", m.mountpoint, "--json",
                          "--snapshot-cmd", str(snap)], capture_output=True, text=True, cwd="/", timeout=120)
    doc = orjson.loads(res.stdout)
    assert doc["pre"][0]["exit_code"] == 0 and os.stat(snap).st_uid == local_user.uid, doc["pre"]
    assert doc["outcome"] == "failed" and doc["snapshot"]["state"] == "failed", res.stdout
    detail = doc["snapshot"]["detail"]
    assert detail.startswith("not run:") and f"{d} is owned by uid {local_user.uid}" in detail, detail
    assert not users_ran.exists() and not roots_ran.exists()
    assert doc["post"][0]["exit_code"] == 0, "the post-scripts still ran"
    assert not loopfs.thaw_path(m.mountpoint)


# ------------------------------------------------------------------ the demo in another account's directories

@pytest.fixture
def victim(tmp_path):
    """A root-owned file and directory the attacker's symlinks point at; their state is checked after."""
    f = tmp_path / "victim"
    f.write_text("root's own\n")
    os.chmod(f, 0o600)
    d = tmp_path / "victim-dir"
    d.mkdir(mode=0o700)
    (d / "keep").write_text("keep\n")
    return f, d


def plant(user, link: pathlib.Path, target: pathlib.Path) -> None:
    """The user's own process puts a symlink at link (in a directory of the user's)."""
    res = user.run(["ln", "-sfn", str(target), str(link)])
    assert res.returncode == 0 and link.is_symlink(), res.stderr


def assert_untouched(victim) -> None:
    f, d = victim
    st = os.stat(f)
    assert f.read_text() == "root's own\n" and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    st = os.stat(d)
    assert st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o700 and (d / "keep").read_text() == "keep\n"


def users_dir(user, area: Area, name: str) -> pathlib.Path:
    """A directory the user's own process made (in its own directory of the area)."""
    d = area.user / name
    res = user.run(["mkdir", "-p", str(d)])
    assert res.returncode == 0, res.stderr
    return d


def test_mariadb_files_in_the_service_accounts_directories_are_not_written_through_symlinks(local_user, victim, area):
    """The server's account (here the user) owns the run directory and the log directory: its symlinks
    at my.cnf, binlog.index and the server log are replaced or refused, never followed by root."""
    srv = servers.MariaDBServer(str(users_dir(local_user, area, "db")), logdir=str(users_dir(local_user, area, "log")),
                                os_user=local_user.name)
    try:
        srv._make_rundir(local_user.uid, local_user.gid, local_user.name)
        rundir = pathlib.Path(srv.rundir)
        assert os.stat(rundir).st_uid == local_user.uid
        plant(local_user, rundir / "my.cnf", victim[0])
        srv._write_cnf()
        cnf = os.lstat(rundir / "my.cnf")
        assert stat.S_ISREG(cnf.st_mode) and cnf.st_uid == 0 and stat.S_IMODE(cnf.st_mode) == 0o600
        assert f"password = {srv.password}" in (rundir / "my.cnf").read_text()
        # The server log, read into an error message by root: never the file a symlink names.
        plant(local_user, rundir / "mariadb.log", victim[0])
        assert "root's own" not in str(srv._fail("start failed"))
        plant(local_user, pathlib.Path(srv.logdir) / "binlog.index", victim[0])
        with pytest.raises(OSError):
            srv._fix_binlog_index()
    finally:
        srv._cleanup()
    assert_untouched(victim)
    assert srv.rundir is None and not rundir.exists()


def test_mariadb_binlog_index_is_rewritten_in_place(local_user, area):
    """The restored copy's index, rewritten through the log directory's fd, points at the copy."""
    log = users_dir(local_user, area, "log")
    res = local_user.run(["sh", "-c", (f"printf '/old/place/binlog.000001\\n/old/place/binlog.000002\\n' "
                                       f"> '{log}/binlog.index'")])
    assert res.returncode == 0, res.stderr
    srv = servers.MariaDBServer(str(users_dir(local_user, area, "db")), logdir=str(log), os_user=local_user.name)
    srv._fix_binlog_index()
    assert (log / "binlog.index").read_text() == f"{log}/binlog.000001\n{log}/binlog.000002\n"
    assert os.stat(log / "binlog.index").st_uid == local_user.uid


def test_sockdir_symlink_of_the_service_account_is_not_chowned_to_it(local_user, victim, area):
    """A socket directory given inside the account's own directory, where it left a symlink to a
    directory of root's: refused; root's directory keeps its owner and mode."""
    sock = users_dir(local_user, area, "run") / "sock"
    plant(local_user, sock, victim[1])
    srv = servers.PostgresServer(str(users_dir(local_user, area, "pg")), sockdir=str(sock), os_user=local_user.name)
    try:
        with pytest.raises(OSError):
            srv._make_rundir(local_user.uid, local_user.gid, local_user.name)
    finally:
        srv._cleanup()
    assert_untouched(victim)


def test_postgresql_conf_and_recovery_files_are_not_written_through_symlinks(local_user, victim, tmp_path, area):
    """initdb runs as the account, so it owns the data directory: its symlinks at postgresql.conf,
    pg_wal and backup_label are refused or replaced; root's file and directory stay as they were."""
    data = users_dir(local_user, area, "pg")
    srv = servers.PostgresServer(str(data), os_user=local_user.name)
    plant(local_user, data / "postgresql.conf", victim[0])
    with pytest.raises(OSError):
        srv._add_conf(local_user.uid, local_user.gid)
    # pg_wal pointing at a directory of root's: its files are not removed, it gets no archive_status.
    plant(local_user, data / "pg_wal", victim[1])
    plant(local_user, data / "backup_label", victim[0])
    archive = area.root / "archive"
    archive.mkdir()
    rec = pgserver._ArchiveRecovery("START WAL LOCATION: 0/2000028\n", None, str(archive), "immediate", False)
    with pytest.raises(OSError):
        srv._prepare_recovery(rec, local_user.uid, local_user.gid)
    assert sorted(os.listdir(victim[1])) == ["keep"]
    # With pg_wal its own directory again, backup_label replaces the symlink: root's file is untouched.
    os.unlink(data / "pg_wal")
    res = local_user.run(["sh", "-c", f"mkdir '{data}/pg_wal' && touch '{data}/pg_wal/000000010000000000000001'"])
    assert res.returncode == 0, res.stderr
    local_user.chown(archive)
    srv._prepare_recovery(rec, local_user.uid, local_user.gid)
    assert os.listdir(data / "pg_wal") == ["archive_status"]
    label = os.lstat(data / "backup_label")
    assert stat.S_ISREG(label.st_mode) and label.st_uid == local_user.uid and stat.S_IMODE(label.st_mode) == 0o600
    assert (data / "backup_label").read_text() == rec.label
    assert_untouched(victim)


def test_demo_report_is_0600_and_never_written_through_a_symlink(local_user, victim, area):
    """`--report PATH` in a directory the user owns, where the user left a symlink: the report replaces
    the link (root's, mode 600) and the file it named is untouched."""
    d = users_dir(local_user, area, "reports")
    report = d / "report.json"
    plant(local_user, report, victim[0])
    output.write_report(str(report), {"ok": True})
    st = os.lstat(report)
    assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and stat.S_IMODE(st.st_mode) == 0o600
    assert orjson.loads(report.read_bytes()) == {"ok": True}
    fresh = d / "fresh.json"
    safeio.write_private(str(fresh), b"{}\n")
    assert stat.S_IMODE(os.stat(fresh).st_mode) == 0o600
    assert [n for n in os.listdir(d) if n.endswith(".tmp")] == []
    assert_untouched(victim)
