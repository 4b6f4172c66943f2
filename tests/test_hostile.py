"""Hostile scripts and files, each with the outcome it must produce, through the whole flow on a loop mount.

HOSTILE_SCRIPTS below is the table of hostile pre-scripts (run here).  The hostile files live in
test_config_trust.py: PLUGIN_CORPUS (33 bad JSON configs → 305), HOST_CORPUS (12 bad INI configs → 304),
test_file_modes_and_owners (18 owner/mode/setuid cases), test_paths_symlinks_and_parents (symlinks to
non-root files, parents writable by others or owned by another user), test_fifo_and_oversize_configs,
test_checked_file_is_the_file_that_is_read; a script changed between the check and its run, and
hypothesis over `pyexec check`, are here.  Whatever the input: one table code, no traceback, nothing
left frozen."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import uuid

import orjson
import pytest
from helpers import needs_root, procs_matching
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from test_config_trust import GOOD_PLUGIN, make, write_setup

from pyexec import errors, host, report
from pyexec.demo import loopfs

pytestmark = needs_root

MARK = f"hostile-{uuid.uuid4().hex[:8]}"
# What a check may find: a config or script missing, unparsable or untrusted; never a run's code
# (300, 301, 308-311) and never a freeze's (121-123) on these configs.
CHECK_CODES = {302, 303, 304, 305, 306, 307, 313, 314, 315, 316, 317, 318}


def foreign_elf() -> bytes:
    """/bin/true with its machine field set to an architecture this machine cannot run."""
    data = bytearray(open("/bin/true", "rb").read())
    data[18:20] = (0xB7 if platform.machine() != "aarch64" else 0x3E).to_bytes(2, "little")
    return bytes(data)


# name → (pre-script bytes, plugin config changes, expected code, check on the ScriptResult)
HOSTILE_SCRIPTS = {
    "ignores SIGTERM": (b"#!/bin/sh\ntrap '' TERM\nwhile :; do sleep 0.05; done\n", {"timeoutInSeconds": 1}, 308,
                        lambda r: r.timed_out and r.signal == 9),
    "setsid daemon keeps stdout open": (
        f"#!/bin/sh\nsetsid sh -c 'sleep 60; :' {MARK} &\necho started\n".encode(), {}, 0,
        # Ended with the script's exit, not at its stdout's EOF (the daemon's, 60 s away; the 30 s
        # timeout would come first and kill it): not timed out, and the daemon still runs.
        lambda r: r.stdout.data == b"started\n" and not r.timed_out and bool(strays())),
    "prints 100 MB": (b"#!/bin/sh\nhead -c 100000000 /dev/zero\n", {}, 0,
                      lambda r: r.stdout.total == 100_000_000 and r.stdout.dropped > 0
                      and len(r.stdout.data) <= 128 << 10),
    "prints invalid UTF-8": (b"#!/bin/sh\nprintf '\\377\\376bad\\n'\n", {}, 0,
                             lambda r: r.stdout.data == b"\xff\xfebad\n"),
    "exits by signal": (b"#!/bin/sh\nkill -SEGV $$\n", {}, 300, lambda r: r.signal == 11),
    "replaces itself with exec sleep": (b"#!/bin/sh\nexec sleep 60\n", {"timeoutInSeconds": 1}, 308,
                                        lambda r: r.timed_out),
    "reads stdin": (b"#!/bin/sh\ncat\necho eof\n", {}, 0, lambda r: r.stdout.data == b"eof\n"),
    "0-byte file": (b"", {}, 0, lambda r: r.exit_code == 0),  # `sh empty` succeeds, as in the reference
    "a directory": (None, {}, 302, None),
    "binary for another architecture": (foreign_elf(), {}, 300, lambda r: "format" in r.detail),
    "no #! line": (b"echo no-shebang\n", {}, 0, lambda r: r.stdout.data == b"no-shebang\n"),
    "#! names a missing interpreter": (b"#!/nonexistent/interp\nexit 0\n", {}, 300,
                                       lambda r: "No such file" in r.detail),
}


def strays() -> list[int]:
    return procs_matching(lambda argv: any(MARK.encode() in a for a in argv))


@pytest.mark.parametrize("name", list(HOSTILE_SCRIPTS))
def test_hostile_pre_script(tmp_path, mounts, name):
    data, plugin_changes, code, check = HOSTILE_SCRIPTS[name]
    m = mounts.make("ext4")
    hc = write_setup(tmp_path, pre=data if data is not None else b"", plugin_doc=plugin_changes)
    if data is None:
        os.unlink(tmp_path / "etc" / "pre.sh")
        os.mkdir(tmp_path / "etc" / "pre.sh", 0o700)
    try:
        rep = host.run(hc, mount_points=[m.mountpoint], freeze_timeout=20)
        assert rep.code == code, (rep.code, rep.pre[0].detail if rep.pre else rep.check_errors)
        assert rep.outcome == (host.APP if code == 0 else host.FS)
        if check is not None:
            assert check(rep.pre[0]), rep.pre[0].as_dict()
        orjson.loads(report.dumps(rep))  # the report is valid JSON whatever the script printed
        assert not loopfs.thaw_path(m.mountpoint), "left frozen"
        if name != "setsid daemon keeps stdout open":
            assert strays() == [], "a script process outlived its run"
    finally:
        for pid in strays():  # the daemon is the script's business, by design; end it here
            os.kill(pid, 9)


@pytest.mark.parametrize("change", ["renamed over", "parent made writable", "removed", "edited in place"])
def test_script_changed_after_the_check(tmp_path, change):
    """Scripts run by their path ($0); right before each spawn the path is walked and checked again and
    must still name the checked inode.  Only root can change a checked path (every directory on it is
    root's and not writable by others), so the window left is the spawn itself, and only root's; root
    can rewrite the checked inode in place anyway, which runs, as it would through the checked fd."""
    ran = tmp_path / "ran"
    hc = write_setup(tmp_path, pre=f"#!/bin/sh\necho checked >> {ran}\n".encode())
    pre, etc = tmp_path / "etc" / "pre.sh", tmp_path / "etc"
    checked = host.check(hc)
    try:
        assert not checked.errors
        if change == "renamed over":
            os.rename(make(etc / "evil", f"#!/bin/sh\necho evil >> {ran}\n".encode()), pre)
        elif change == "parent made writable":
            os.chmod(etc, 0o777)
        elif change == "removed":
            os.unlink(pre)
        else:
            with open(pre, "r+b") as f:  # same inode
                f.write(f"#!/bin/sh\necho edit >> {ran}\n".encode())
                f.truncate()
        (r,) = host.run_phase(checked, "pre")
    finally:
        checked.close()
        os.chmod(etc, 0o700)
    expect = {"renamed over": (306, "replaced after it was checked"), "parent made writable": (306, "writable"),
              "removed": (302, "not found"), "edited in place": (0, "")}[change]
    assert (r.error_code, r.exit_code is None) == (expect[0], expect[0] != 0) and expect[1] in r.detail, r.as_dict()
    assert (ran.read_text() if ran.exists() else "") == ("edit\n" if change == "edited in place" else "")


# ---- hypothesis over `pyexec check` -------------------------------------------------------------

json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=20),
                           lambda c: st.lists(c, max_size=3) | st.dictionaries(st.text(max_size=8), c, max_size=3),
                           max_leaves=8)
plugin_docs = st.fixed_dictionaries({}, optional={k: json_values for k in GOOD_PLUGIN}).map(
    lambda d: {**{k: v for k, v in GOOD_PLUGIN.items() if k not in d}, **d})
ini_values = st.one_of(st.integers(-5, 5000).map(str), st.text(alphabet="0123456789-x. ", max_size=6))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=plugin_docs, timeout=ini_values, n=ini_values, raw=st.binary(max_size=64))
def test_check_on_generated_configs_gives_table_errors_only(tmp_path, doc, timeout, n, raw):
    d = tmp_path / "etc"
    # stdlib json writes what orjson refuses (huge ints, NaN): hostile input for the parser
    pj = make(d / "plugin.json", json.dumps(doc).encode() if raw[:1] != b"!" else raw, mode=0o600)
    hc = make(d / "host.conf", f"[pre_post]\ntimeoutInSeconds = {timeout}\nnumberOfPlugins = {n}\n"
              f"pluginName0 = p\npluginPath0 = {d}\npluginConfigPath0 = {pj}\n".encode(), mode=0o600)
    res = host.check(hc)
    try:
        assert {e.code for e in res.errors} <= CHECK_CODES
        assert res.errors or res.plugins or res.host.plugins == ()  # numberOfPlugins 0 is valid
    finally:
        res.close()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(doc=plugin_docs)
def test_check_command_on_generated_configs_never_tracebacks(tmp_path, doc):
    d = tmp_path / "etc"
    pj = make(d / "plugin.json", json.dumps(doc).encode(), mode=0o600)
    hc = make(d / "host.conf", f"[pre_post]\nnumberOfPlugins = 1\npluginName0 = p\npluginPath0 = {d}\n"
              f"pluginConfigPath0 = {pj}\n".encode(), mode=0o600)
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "check", "--config", hc, "--json"],
                       capture_output=True, cwd="/", timeout=60)
    assert b"Traceback" not in r.stderr
    out = orjson.loads(r.stdout)
    assert {p["code"] for p in out["problems"]} <= CHECK_CODES
    assert all(p["name"] == errors.TABLE[p["code"]].name for p in out["problems"])
    assert (r.returncode == 0) == out["ok"]
