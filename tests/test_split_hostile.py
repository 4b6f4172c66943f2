"""Issue 19, attack 5, on real parts: a built-in quiescer's phases split across `pluginhost pre` and
`pluginhost post` processes (real MariaDB and PostgreSQL servers)."""
from __future__ import annotations

import os
import pathlib
import subprocess
import sys

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
