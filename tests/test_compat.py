"""`pyexec.pluginhost.PluginHost` and `pluginhost pre|post`: the reference's shapes, and its codes for every
error row of the seed's table, on real files and real scripts."""
from __future__ import annotations

import os
import subprocess
import sys
import tomllib

import orjson
import pytest
from helpers import needs_root
from test_config_trust import write_setup

import pyexec
from pyexec import errors
from pyexec.azure import pluginhost
from pyexec.demo import loopfs

pytestmark = needs_root

PLUGINHOST = os.path.join(os.path.dirname(sys.executable), "pluginhost")


class ListLogger:
    """The reference's logger interface, recording what it is told."""

    def __init__(self):
        self.lines = []

    def log(self, msg, local=True, level="Info"):
        self.lines.append((level, msg))


def host_for(tmp_path, **setup) -> pluginhost.PluginHost:
    ph = pluginhost.PluginHost(ListLogger())
    ph.configLocation = write_setup(tmp_path, **setup)
    return ph


def test_default_location_and_success_shapes(tmp_path):
    assert pluginhost.PluginHost(None).configLocation == "/etc/azure/VMSnapshotPluginHost.conf"
    ph = host_for(tmp_path, plugins=2)
    assert ph.pre_check() == (0, True, True)
    assert ph.noOfPlugins == 2 and ph.pluginName == ["ScriptRunner0", "ScriptRunner1"]
    pre = ph.pre_script()
    assert [(e.errorCode, e.pluginName) for e in pre.errors] == [(0, "ScriptRunner0"), (0, "ScriptRunner1")]
    assert pre.anyScriptFailed is False and pre.continueBackup is True and pre.errorCode == 0
    assert [r.stdout.data for r in pre.scripts] == [b"pre\n", b"pre\n"]
    post = ph.post_script()
    assert [e.errorCode for e in post.errors] == [0, 0] and not post.anyScriptFailed
    assert "Final Error Code :- 0" in str(post)
    ph.close()
    assert any("Continue Backup: True" in m for _, m in ph.logger.lines)


# The seed's error rows, each with how to provoke it and the phase that reports it.
SEED_ROWS = [
    ("Pre-ScriptExecutionFailed", dict(pre=b"#!/bin/sh\nexit 3\n"), "pre"),
    ("Post-ScriptExecutionFailed", dict(post=b"#!/bin/sh\nexit 3\n"), "post"),
    ("Pre-ScriptNotFound", dict(plugin_doc={"preScriptLocation": "/nonexistent/pre.sh"}), "check"),
    ("Post-ScriptNotFound", dict(plugin_doc={"postScriptLocation": "/nonexistent/post.sh"}), "check"),
    ("IncorrectPluginhostFile", dict(host_extra=b"numberOfPlugins = x\n"), "check"),
    ("IncorrectJSONConfigFile", dict(plugin_doc={"timeoutInSeconds": "thirty"}), "check"),
    ("InsufficientPermissionforPre-Script", dict(mode={"pre.sh": 0o777}), "check"),
    ("InsufficientPermissionforPost-Script", dict(mode={"post.sh": 0o755}), "check"),
    ("Pre-ScriptTimeout", dict(pre=b"#!/bin/sh\nsleep 30\n", plugin_doc={"timeoutInSeconds": 1}), "pre"),
    ("Post-ScriptTimeout", dict(post=b"#!/bin/sh\nsleep 30\n", plugin_doc={"timeoutInSeconds": 1}), "post"),
]
CODE_OF = {e.name: e.code for e in errors.TABLE.values()}


@pytest.mark.parametrize("name,setup,where", SEED_ROWS, ids=[r[0] for r in SEED_ROWS])
def test_seed_error_rows_give_the_reference_codes(tmp_path, name, setup, where):
    mode = setup.pop("mode", {})
    ph = host_for(tmp_path, **setup)
    for fname, m in mode.items():
        os.chmod(tmp_path / "etc" / fname, m)
    code, dobackup, _fs_on = ph.pre_check()
    try:
        if where == "check":
            assert code == CODE_OF[name] and dobackup is True
            res = ph.pre_script()
            assert res.errorCode == code and res.errors == [] and res.continueBackup
            return
        assert code == 0
        res = ph.pre_script() if where == "pre" else (ph.pre_script(), ph.post_script())[1]
    finally:
        ph.close()
    assert [(e.errorCode, e.pluginName) for e in res.errors] == [(CODE_OF[name], "ScriptRunner0")]
    assert res.anyScriptFailed and res.errorCode == CODE_OF[name]
    assert res.continueBackup is True  # continueBackupOnFailure is true in the setup


def test_continue_on_failure_false_stops_the_backup(tmp_path):
    ph = host_for(tmp_path, pre=b"#!/bin/sh\nexit 1\n", plugin_doc={"continueBackupOnFailure": False})
    # The reference's pre_check returns continueBackupOnFailure as dobackup (ScriptRunner.validate_scripts).
    assert ph.pre_check() == (0, False, True)
    res = ph.pre_script()
    ph.close()
    assert res.anyScriptFailed and res.continueBackup is False and res.errorCode == 300


def test_fs_freeze_disabled_is_reported_by_pre_check(tmp_path):
    ph = host_for(tmp_path, plugin_doc={"fsFreezeEnabled": False})
    assert ph.pre_check() == (0, True, False)
    ph.close()


def test_pre_script_without_pre_check_checks_first(tmp_path):
    ph = host_for(tmp_path)
    res = ph.pre_script()
    ph.close()
    assert [e.errorCode for e in res.errors] == [0] and ph.noOfPlugins == 1


def run_verb(hc, *argv):
    res = subprocess.run([PLUGINHOST, "--config", hc, *argv], capture_output=True, cwd="/", timeout=60)
    assert b"Traceback" not in res.stderr
    return res


def test_pluginhost_command_pre_and_post(tmp_path):
    seen = tmp_path / "seen"
    hc = write_setup(tmp_path, post=f'#!/bin/sh\necho "$PYEXEC_SNAPSHOT" > {seen}\n'.encode())
    pre = run_verb(hc, "pre", "--json")
    doc = orjson.loads(pre.stdout)
    assert pre.returncode == 0 and doc["errors"] == [{"errorCode": 0, "pluginName": "ScriptRunner0"}]
    assert doc["scripts"][0]["stdout"]["text"] == "pre\n" and doc["fsFreeze_on"] is True
    post = run_verb(hc, "post", "--snapshot", "failed")
    assert post.returncode == 0 and b"Final Error Code :- 0" in post.stdout
    assert seen.read_text() == "failed\n"


def test_pluginhost_command_exit_statuses(tmp_path):
    hc = write_setup(tmp_path, pre=b"#!/bin/sh\nexit 1\n")
    assert run_verb(hc, "pre").returncode == 1, "failed but the backup goes on"
    hc = write_setup(tmp_path, pre=b"#!/bin/sh\nexit 1\n", plugin_doc={"continueBackupOnFailure": False})
    assert run_verb(hc, "pre").returncode == 2, "failed and the backup stops"
    missing = run_verb(str(tmp_path / "nope.conf"), "pre", "--json")
    assert missing.returncode == errors.TABLE[313].exit_status and orjson.loads(missing.stdout)["errorCode"] == 313
    check = run_verb(hc, "check")
    assert check.returncode == 0 and b"ok:" in check.stdout


def test_version_is_declared_once():
    with open(os.path.join(os.path.dirname(__file__), "..", "pyproject.toml"), "rb") as f:
        declared = tomllib.load(f)["project"]["version"]
    assert pyexec.__version__ == declared
    for prog in (PLUGINHOST, os.path.join(os.path.dirname(sys.executable), "pyexec")):
        res = subprocess.run([prog, "--version"], capture_output=True, text=True, timeout=60)
        assert res.returncode == 0 and res.stdout == f"{os.path.basename(prog)} {declared}\n"


def test_relative_config_is_read_from_the_working_directory(tmp_path):
    write_setup(tmp_path)
    res = subprocess.run([PLUGINHOST, "--config", "etc/host.conf", "pre", "--json"], capture_output=True,
                         cwd=tmp_path, timeout=60)
    assert res.returncode == 0, res.stderr
    assert orjson.loads(res.stdout)["errors"] == [{"errorCode": 0, "pluginName": "ScriptRunner0"}]


def test_pluginhost_run_freezes_only_the_given_mounts(tmp_path, mounts):
    helptext = subprocess.run([PLUGINHOST, "--help"], capture_output=True, text=True, timeout=60).stdout
    assert "every local filesystem" in " ".join(helptext.split())
    m = mounts.make("ext4")
    hc = write_setup(tmp_path)
    res = subprocess.run([PLUGINHOST, "--config", hc, "run", "--mount", m.mountpoint, "--json"],
                         capture_output=True, cwd="/", timeout=120)
    doc = orjson.loads(res.stdout)
    assert res.returncode == 0 and doc["outcome"] == "app-consistent", res.stderr
    assert doc["mounts"] == [m.mountpoint] and [x["path"] for x in doc["window"]["mounts"]] == [m.mountpoint]
    assert not loopfs.thaw_path(m.mountpoint)
    bad = subprocess.run([PLUGINHOST, "--config", hc, "check", "--mount", m.mountpoint], capture_output=True,
                         text=True, timeout=60)
    assert bad.returncode == 2 and "--mount applies to run only" in bad.stderr


@pytest.mark.parametrize("argv,code", [(["--config", "nope.conf", "pre"], 313), (["--config", "etc", "check"], 304),
                                       (["--config", "etc/pre.sh", "post"], 304)])
def test_bad_input_is_one_table_error_and_a_nonzero_exit(tmp_path, argv, code):
    write_setup(tmp_path)
    res = subprocess.run([PLUGINHOST, *argv], capture_output=True, text=True, cwd=tmp_path, timeout=60)
    out = res.stdout + res.stderr
    assert res.returncode != 0 and "Traceback" not in out
    assert f"{code}  {errors.TABLE[code].name}" in out or f"{code} {errors.TABLE[code].name}" in out, out
    assert str(tmp_path / argv[1]) in out, "the relative path is reported resolved"
