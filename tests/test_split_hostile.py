"""Issue 19, attack 5 and a lower item, on real parts: a built-in quiescer's phases split across
`pluginhost pre` and `pluginhost post` processes (real MariaDB and PostgreSQL servers), and a snapshot
command found on root's PATH in a directory a real unprivileged user owns."""
from __future__ import annotations

import os
import pathlib
import shlex
import shutil
import subprocess
import sys
import tempfile

import orjson
import pytest

from helpers import IS_ROOT
from pyexec import errors
from pyexec.demo import loopfs
from test_config_trust import make, write_setup
from test_quiesce import sandbox, write_now

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
    res = user.run(["sh", "-c", f"mkdir -p '{directory}' && printf '#!/bin/sh\\nid -u > {marker}\\n' > '{prog}' "
                                f"&& chmod 755 '{prog}'"])
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
