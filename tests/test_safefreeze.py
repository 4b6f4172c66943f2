"""`safefreeze` driven the way the Azure extension's VMBackup/main/fsfreezer.py drives its helper
(Azure/azure-linux-extensions): SIGUSR1 and SIGCHLD handlers, the helper started with stdout on a
pipe, a wait for its SIGUSR1, the snapshot, SIGUSR1 back, the stdout read after it exits, and its exit
status mapped as fsfreezer.py and freezesnapshotter.py map it (`extension_verdict`)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import pytest
from helpers import needs_root
from test_freeze_window import writable_within

from pyexec.azure import safefreeze
from pyexec.demo import loopfs

pytestmark = needs_root

SAFEFREEZE = os.path.join(os.path.dirname(sys.executable), "safefreeze")

# fsfreezer.py's FreezeHandler: sig_handle 0 = nothing yet, 1 = the helper froze (its SIGUSR1),
# 2 = the helper exited (SIGCHLD).  startproc waits for it (the reference polls every 2 s for up to
# SafeFreezeWaitInSeconds, 66 by default); then the snapshot; then thaw_safe: if the helper still
# runs, SIGUSR1 and up to 30 s for its exit; its stdout is read only after that.  Commands on stdin
# stand for what happens during the snapshot: "thaw" (thaw_safe), "die" (the backup agent crashes)
# or "term" (SIGTERM instead of SIGUSR1: not the extension's way, the helper's other thaw signals).
DRIVER = r"""
import json, os, signal, subprocess, sys, time
state = {"sig": 0}
child = None

def on_usr1(*_):
    state["sig"] = 1

def on_chld(*_):
    if child is not None and child.poll() is not None:
        state["sig"] = 2

signal.signal(signal.SIGUSR1, on_usr1)
signal.signal(signal.SIGCHLD, on_chld)
child = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE)
deadline = time.monotonic() + 20
while state["sig"] == 0 and time.monotonic() < deadline:
    if child.poll() is not None:  # its SIGCHLD came before `child` was set
        state["sig"] = 2
    time.sleep(0.005)
print(json.dumps({"sig_handle": state["sig"], "pid": child.pid}), flush=True)
exited_before = None
if state["sig"] == 1:
    cmd = sys.stdin.readline().strip()
    if cmd == "die":
        os._exit(9)
    exited_before = child.poll() is not None
    if not exited_before:
        child.send_signal(signal.SIGUSR1 if cmd == "thaw" else signal.SIGTERM)
        for _ in range(300):
            if child.poll() is not None:
                break
            time.sleep(0.1)
out = child.stdout.read().decode("utf-8", "backslashreplace")
print(json.dumps({"returncode": child.wait(), "exited_before_thaw": exited_before, "stdout": out}), flush=True)
"""


def extension_verdict(d: dict):
    """What the extension makes of one helper run: a code when the freeze failed (freeze_safe, then
    freezesnapshotter: 122 no signal in time, 123 a `Failed to open:` line, else 121), otherwise the
    verdict of thaw_safe: "consistent" (exit 0 after the thaw), "unable to sleep" (it had exited 2),
    "inconsistent" (any other exit before or after the thaw)."""
    if d["sig_handle"] != 1:
        if d["sig_handle"] == 0:
            return 122
        return 123 if "Failed to open:" in d["stdout"] else 121
    if d["exited_before_thaw"]:
        return "unable to sleep" if d["returncode"] == 2 else "inconsistent"
    return "consistent" if d["returncode"] == 0 else "inconsistent"


class Extension:
    """The driver process, safefreeze's parent, on the given arguments."""

    def __init__(self, *args: str):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, SAFEFREEZE, *args],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        first = json.loads(self.proc.stdout.readline())
        self.sig_handle, self.pid = first["sig_handle"], first["pid"]

    def finish(self, cmd: str = "thaw") -> dict:
        """Say what happened during the snapshot; the helper's run as the extension saw it."""
        if self.sig_handle == 1:
            self.proc.stdin.write((cmd + "\n").encode())
        self.proc.stdin.close()
        d = {"sig_handle": self.sig_handle, **json.loads(self.proc.stdout.readline())}
        self.proc.wait(timeout=60)
        d["verdict"] = extension_verdict(d)
        return d

    def close(self):
        self.proc.kill()
        self.proc.wait()


def frozen(writer, settle: float = 0.2) -> bool:
    c0 = writer.count()
    time.sleep(settle)
    return writer.count() - c0 <= 1


def test_freeze_snapshot_thaw_is_consistent(mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    wa, wb = mounts.writer(os.path.join(a.mountpoint, "f")), mounts.writer(os.path.join(b.mountpoint, "f"))
    ext = Extension("30", a.mountpoint, b.mountpoint)
    try:
        assert ext.sig_handle == 1, "safefreeze did not send SIGUSR1 to its parent"
        assert frozen(wa) and frozen(wb)
        d = ext.finish("thaw")
    finally:
        ext.close()
    assert d["verdict"] == "consistent", d
    assert writable_within(wa, 10) is not None and writable_within(wb, 10) is not None
    assert f"{a.mountpoint}: thawed" in d["stdout"] and "ended by SIGUSR1" in d["stdout"]


def test_unopenable_mount_is_123_and_nothing_is_frozen(mounts, tmp_path):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    ext = Extension("30", a.mountpoint, str(tmp_path / "nope"))
    try:
        d = ext.finish()
    finally:
        ext.close()
    assert (d["verdict"], d["returncode"]) == (123, safefreeze.EXIT_FAILED), d
    assert f"Failed to open: {tmp_path / 'nope'}\n" in d["stdout"] and "Traceback" not in d["stdout"]
    # FITHAW answering EINVAL is the proof nothing is frozen; a writer's pause alone is not (a loaded
    # machine's writeback can hold it 200 ms), so its progress is awaited, not timed.
    assert not loopfs.thaw_path(a.mountpoint) and writable_within(w, 10) is not None


def test_not_a_directory_is_reported_as_the_reference_does(mounts, tmp_path):
    a = mounts.make("ext4")
    (tmp_path / "file").write_text("x")
    ext = Extension("30", a.mountpoint, str(tmp_path / "file"))
    try:
        d = ext.finish()
    finally:
        ext.close()
    # The reference helper says "Path not a directory:", which its caller reports as 121.
    assert d["verdict"] == 121 and f"Path not a directory: {tmp_path / 'file'}\n" in d["stdout"], d
    assert not loopfs.thaw_path(a.mountpoint)


def test_tmpfs_cannot_be_frozen_121(mounts, tmp_path):
    a = mounts.make("ext4")
    t = tmp_path / "tmpfs"
    t.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "pyexec-test", str(t)], check=True)
    try:
        ext = Extension("30", a.mountpoint, str(t))
        try:
            d = ext.finish()
        finally:
            ext.close()
    finally:
        loopfs.thaw_path(str(t))  # only if the kernel did freeze it after all
        subprocess.run(["umount", str(t)], check=True)
    assert (d["verdict"], d["returncode"]) == (121, safefreeze.EXIT_FAILED), d
    assert "Operation not supported" in d["stdout"]
    assert not loopfs.thaw_path(a.mountpoint), "the mount frozen before the tmpfs was left frozen"


def test_mount_frozen_by_another_tool_is_121_and_stays_theirs(mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    subprocess.run(["fsfreeze", "-f", b.mountpoint], check=True)
    try:
        ext = Extension("30", a.mountpoint, b.mountpoint)
        try:
            d = ext.finish()
        finally:
            ext.close()
        assert (d["verdict"], d["returncode"]) == (121, safefreeze.EXIT_FAILED), d
        assert "121" in d["stdout"]
    finally:
        assert loopfs.thaw_path(b.mountpoint), "the other tool's freeze was undone"
    assert not loopfs.thaw_path(a.mountpoint), "our own freeze was left behind"


@pytest.mark.parametrize("timeout", ["0", "-3", "abc", "nan", "inf", "86400.5", "1e12"])
def test_bad_timeout_exits_1_never_2(mounts, timeout):
    a = mounts.make("ext4")
    ext = Extension(timeout, a.mountpoint)
    try:
        d = ext.finish()
    finally:
        ext.close()
    # 2 would read as "Unable to execute sleep" once the helper had frozen; a usage error is 1.
    assert (d["verdict"], d["returncode"]) == (121, safefreeze.EXIT_FAILED), d
    assert "Usage: safefreeze" in d["stdout"] and "Traceback" not in d["stdout"]
    assert not loopfs.thaw_path(a.mountpoint)


@pytest.mark.parametrize("argv", [[], ["5"]])
def test_missing_arguments_exit_1_with_usage_on_stdout(argv):
    res = subprocess.run([SAFEFREEZE, *argv], capture_output=True, text=True, timeout=30)
    assert res.returncode == safefreeze.EXIT_FAILED
    assert "Usage: safefreeze" in res.stdout and "Traceback" not in res.stdout + res.stderr


def test_snapshot_longer_than_the_timeout_is_inconsistent(mounts):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    ext = Extension("1", a.mountpoint)
    try:
        assert ext.sig_handle == 1 and frozen(w)
        # A wait (10x the 1 s timeout) for the thaw; that the timeout did it, the output says below.
        assert writable_within(w, 10) is not None, "not thawed at the timeout"
        d = ext.finish("thaw")
    finally:
        ext.close()
    # Whether it had exited by the time the SIGUSR1 came or not, the late thaw request is harmless.
    assert (d["verdict"], d["returncode"]) == ("inconsistent", 1), d
    assert "ended by timeout" in d["stdout"]


def test_other_thaw_signal_is_inconsistent(mounts):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    ext = Extension("30", a.mountpoint)
    try:
        assert ext.sig_handle == 1 and frozen(w)
        d = ext.finish("term")
    finally:
        ext.close()
    assert (d["verdict"], d["returncode"]) == ("inconsistent", 1) and "ended by SIGTERM" in d["stdout"], d
    assert writable_within(w, 10) is not None


def test_caller_dying_during_the_hold_thaws_at_once(mounts):
    """The caller's death, not safefreeze's timeout (an hour) nor the test's watchdog (never fired,
    30 s from the death), is what can thaw within the wait."""
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    ext = Extension("3600", a.mountpoint)
    try:
        assert ext.sig_handle == 1 and frozen(w)
        mounts.rearm()
        ext.proc.stdin.write(b"die\n")
        ext.proc.stdin.flush()
        ext.proc.wait(timeout=10)
        took = writable_within(w, 15)  # a wait for the thaw (milliseconds), not a speed bound
    finally:
        ext.close()
    assert took is not None and not mounts.fired, "the caller's death did not thaw"
    print(f"writable {took * 1e3:.1f} ms after the caller's exit was seen")
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{ext.pid}/fd") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{ext.pid}/fd"), "safefreeze outlived its caller"
