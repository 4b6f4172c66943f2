"""The whole plugin-host flow on a loop mount: every outcome row, retries, timeouts, env."""
from __future__ import annotations

import os

import pytest
from helpers import needs_root
from test_config_trust import write_setup

from pyexec import host
from pyexec.demo import loopfs

pytestmark = needs_root


def run(tmp_path, m, snapshot=None, **setup):
    hc = write_setup(tmp_path, **setup)
    return host.run(hc, mount_points=[m.mountpoint], snapshot=snapshot, freeze_timeout=20)


def test_app_consistent_and_post_sees_snapshot(tmp_path, mounts):
    m = mounts.make("ext4")
    seen = tmp_path / "seen"
    post = f'#!/bin/sh\necho "$PYEXEC_PHASE $PYEXEC_SNAPSHOT $1" > {seen}\n'.encode()
    frozen_during = []
    rep = run(tmp_path, m, snapshot=lambda w: frozen_during.append(w.mounts[0].state), post=post,
              plugin_doc={"postScriptParams": ["p1"]})
    assert rep.outcome == host.APP and rep.code == 0
    assert frozen_during == ["frozen"]
    assert seen.read_text() == "post taken p1\n"
    assert rep.pre[0].stdout.data == b"pre\n"
    assert not loopfs.thaw_path(m.mountpoint)


@pytest.mark.parametrize("cont,outcome", [(True, host.FS), (False, host.FAILED)])
def test_failed_pre_script(tmp_path, mounts, cont, outcome):
    m = mounts.make("ext4")
    seen = tmp_path / "seen"
    rep = run(tmp_path, m, pre=b"#!/bin/sh\nexit 1\n", post=f"#!/bin/sh\necho $PYEXEC_SNAPSHOT > {seen}\n".encode(),
              plugin_doc={"continueBackupOnFailure": cont})
    assert rep.outcome == outcome and rep.code == 300
    assert seen.read_text().strip() == ("taken" if cont else "skipped"), "post-script must run either way"


def test_failed_pre_with_freeze_disabled_fails(tmp_path, mounts):
    m = mounts.make("ext4")
    rep = run(tmp_path, m, pre=b"#!/bin/sh\nexit 1\n", plugin_doc={"fsFreezeEnabled": False})
    assert rep.outcome == host.FAILED and rep.code == 300 and rep.window is None


def test_retry_reruns_the_script(tmp_path, mounts):
    m = mounts.make("ext4")
    n = tmp_path / "n"
    pre = f'#!/bin/sh\necho x >> {n}\n[ "$(wc -l < {n})" -ge 2 ]\n'.encode()
    rep = run(tmp_path, m, pre=pre, plugin_doc={"preScriptNoOfRetries": 2})
    assert rep.outcome == host.APP and rep.pre[0].tries == 2 and n.read_text() == "x\nx\n"


def test_pre_timeout_kills_and_goes_on(tmp_path, mounts):
    m = mounts.make("ext4")
    pid_file = tmp_path / "pid"
    pre = f"#!/bin/sh\necho $$ > {pid_file}\nsleep 60\n".encode()
    rep = run(tmp_path, m, pre=pre, plugin_doc={"timeoutInSeconds": 1})
    assert rep.outcome == host.FS and rep.code == 308 and rep.pre[0].timed_out
    assert not os.path.exists(f"/proc/{pid_file.read_text().strip()}")


def test_failed_post_script_is_301(tmp_path, mounts):
    m = mounts.make("ext4")
    rep = run(tmp_path, m, post=b"#!/bin/sh\nexit 4\n")
    assert rep.outcome == host.FS and rep.code == 301


def test_config_problem_falls_back_to_fs_consistent(tmp_path, mounts):
    m = mounts.make("ext4")
    rep = run(tmp_path, m, plugin_doc={"timeoutInSeconds": "30"})
    assert rep.outcome == host.FS and rep.code == 305 and rep.pre == [] and rep.window is not None


def test_no_plugin_is_file_system_consistent_not_app(tmp_path, mounts):
    """Nothing quiesced the application: a clean freeze and snapshot are file-system consistent."""
    m = mounts.make("ext4")
    rep = run(tmp_path, m, plugins=0)
    assert (rep.outcome, rep.code, rep.snapshot, rep.pre) == (host.FS, 0, "taken", [])
    assert any("nothing was quiesced" in w for w in rep.warnings)
    assert not loopfs.thaw_path(m.mountpoint)


def test_shell_operators_in_a_snapshot_command_are_words_and_warned(tmp_path, mounts):
    """No shell runs the snapshot command: `&&` reaches the program as an argument, and the report says
    so (the program here prints its arguments, so the second command never runs)."""
    m = mounts.make("ext4")
    rep = run(tmp_path, m, snapshot=["/bin/echo", "taken", "&&", "touch", str(tmp_path / "second")])
    assert rep.snapshot == "taken" and not (tmp_path / "second").exists()
    assert rep.snapshot_run is not None and rep.snapshot_run.stdout is not None
    assert b"taken && touch" in rep.snapshot_run.stdout.data
    assert any("has && as arguments: no shell runs it" in w for w in rep.warnings), rep.warnings
