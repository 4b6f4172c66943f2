"""`safefreeze` driven the way the reference driver drives it: a parent that starts it, waits for
SIGUSR1, takes its snapshot, sends SIGUSR1 and reads the exit status.  Also its timeout, the parent's
death, a thaw by SIGTERM, a foreign freeze and bad arguments."""
from __future__ import annotations

import os
import subprocess
import sys
import time

import pytest

from helpers import needs_root
from pyexec import loopfs, safefreeze
from test_freeze_window import writable_within

pytestmark = needs_root

SAFEFREEZE = os.path.join(os.path.dirname(sys.executable), "safefreeze")

# The driver: block SIGUSR1 (so it is never lost), start safefreeze, sigwait for its signal, then obey
# one command from stdin: "thaw" (send SIGUSR1), "term"/"hup" (SIGTERM/SIGHUP), "wait" (let it time out) or
# "die" (exit at once, as a crashed backup agent would).
DRIVER = r"""
import os, signal, subprocess, sys
signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGUSR1})
p = subprocess.Popen(sys.argv[1:], stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
info = signal.sigtimedwait({signal.SIGUSR1}, 20)
print("frozen" if info is not None and info.si_pid == p.pid else "no-signal", p.pid, flush=True)
cmd = sys.stdin.readline().strip()
if cmd == "die":
    os._exit(9)
sig = {"thaw": signal.SIGUSR1, "term": signal.SIGTERM, "hup": signal.SIGHUP}.get(cmd)
if sig:
    os.kill(p.pid, sig)
out = p.stdout.read().decode()
print("exit", p.wait(), flush=True)
sys.stdout.write(out)
"""


class Driver:
    """A driver process running safefreeze on the given mounts."""

    def __init__(self, timeout: float, *paths: str):
        self.proc = subprocess.Popen([sys.executable, "-c", DRIVER, SAFEFREEZE, str(timeout), *paths],
                                     stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd="/")
        first = self.proc.stdout.readline().decode().split()
        self.signalled = first[:1] == ["frozen"]
        self.pid = int(first[1]) if len(first) > 1 else 0

    def say(self, cmd: str) -> tuple[int, str]:
        """Send a command; the safefreeze exit status and its output."""
        out, _ = self.proc.communicate(cmd.encode() + b"\n", timeout=30)
        lines = out.decode().splitlines()
        if not lines or not lines[0].startswith("exit "):
            return -999, out.decode()
        return int(lines[0].split()[1]), "\n".join(lines[1:])

    def close(self):
        self.proc.kill()
        self.proc.wait()


def frozen(writer, settle: float = 0.2) -> bool:
    c0 = writer.count()
    time.sleep(settle)
    return writer.count() - c0 <= 1


def test_reference_protocol_freeze_signal_thaw_exit_0(mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    wa, wb = mounts.writer(os.path.join(a.mountpoint, "f")), mounts.writer(os.path.join(b.mountpoint, "f"))
    d = Driver(30, a.mountpoint, b.mountpoint)
    try:
        assert d.signalled, "safefreeze did not send SIGUSR1 to its parent"
        assert frozen(wa) and frozen(wb)
        rc, out = d.say("thaw")
    finally:
        d.close()
    assert rc == safefreeze.EXIT_THAWED, out
    assert writable_within(wa, 10) is not None and writable_within(wb, 10) is not None
    assert f"{a.mountpoint}: thawed" in out and "ended by SIGUSR1" in out


@pytest.mark.parametrize("timeout,cmd,reason", [(1, "wait", "timeout"), (30, "term", "SIGTERM"),
                                                 (30, "hup", "SIGHUP")])
def test_timeout_or_other_signal_thaws_and_exits_1(mounts, timeout, cmd, reason):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    d = Driver(timeout, a.mountpoint)
    try:
        assert d.signalled and frozen(w)
        t0 = time.monotonic()
        rc, out = d.say(cmd)
        took = time.monotonic() - t0
    finally:
        d.close()
    assert rc == safefreeze.EXIT_FAILED and f"ended by {reason}" in out, out
    assert took < timeout + 4, f"it took {took:.2f}s to end"
    assert writable_within(w, 10) is not None


def test_parent_death_thaws_at_once(mounts):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    d = Driver(30, a.mountpoint)
    try:
        assert d.signalled and frozen(w)
        d.proc.stdin.write(b"die\n")
        d.proc.stdin.flush()
        d.proc.wait(timeout=10)
        took = writable_within(w, 10)
    finally:
        d.close()
    assert took is not None and took < 5, "the parent's death did not thaw"
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{d.pid}") and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not os.path.exists(f"/proc/{d.pid}/fd"), "safefreeze outlived its parent"


def test_foreign_freeze_fails_without_signal_and_stays_foreign(mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    subprocess.run(["fsfreeze", "-f", b.mountpoint], check=True)
    res = subprocess.run([SAFEFREEZE, "5", a.mountpoint, b.mountpoint], capture_output=True, text=True, timeout=30)
    assert res.returncode == safefreeze.EXIT_FAILED and "121" in res.stdout
    assert loopfs.thaw_path(b.mountpoint), "the other tool's freeze was undone"
    assert not loopfs.thaw_path(a.mountpoint), "our own freeze was left behind"


@pytest.mark.parametrize("argv", [[], ["5"], ["0", "/"], ["-3", "/"], ["abc", "/"], ["nan", "/"], ["inf", "/"],
                                  ["86400.5", "/"], ["1e12", "/"]])
def test_bad_arguments_exit_1_with_usage_on_stdout(argv):
    # 1, not 2: the extension's fsfreezer.py reads 2 as "Unable to execute sleep".
    res = subprocess.run([SAFEFREEZE, *argv], capture_output=True, text=True, timeout=30)
    assert res.returncode == safefreeze.EXIT_FAILED
    assert "Usage: safefreeze" in res.stdout and "Traceback" not in res.stdout + res.stderr


def test_missing_mount_point_says_failed_to_open(tmp_path):
    res = subprocess.run([SAFEFREEZE, "5", str(tmp_path / "nope")], capture_output=True, text=True, timeout=30)
    assert res.returncode == safefreeze.EXIT_FAILED and "Traceback" not in res.stdout + res.stderr
    assert f"Failed to open: {tmp_path / 'nope'}\n" in res.stdout and "123" in res.stdout
