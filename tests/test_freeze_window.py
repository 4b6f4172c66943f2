"""pyexec.freeze on loop mounts: the window, the guardian's bound, controller and guardian
death, foreign freezes and the run lock."""
from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from helpers import needs_root, procs_matching
from test_config_trust import write_setup

from pyexec import errors, journal, native, window
from pyexec.demo import loopfs

pytestmark = needs_root


def writable_within(writer, timeout: float) -> float | None:
    """Seconds until the writer makes progress again, or None."""
    t0 = time.monotonic()
    c0 = writer.count()
    while time.monotonic() - t0 < timeout:
        if writer.count() > c0 + 1:
            return time.monotonic() - t0
        time.sleep(0.001)
    return None


def test_window_freezes_and_thaws_with_stamps(nat, mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    with window.freeze([a.mountpoint, b.mountpoint, a.mountpoint], timeout=20, backend=nat) as win:
        c0 = w.count()
        time.sleep(0.2)
        assert w.count() - c0 <= 1
    assert writable_within(w, 10) is not None
    assert win.paths == [a.mountpoint, b.mountpoint], "a superblock is frozen once"
    assert [m.state for m in win.mounts] == ["thawed", "thawed"]
    assert win.guardian == "idle" and win.error is None
    assert win.hold_ns >= 0.2e9 and win.length_ns >= win.hold_ns
    assert win.overhead_ns < win.length_ns
    assert win.journal and not os.path.exists(win.journal)


def test_guardian_thaws_at_the_deadline(nat, mounts):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    with pytest.raises(errors.FreezeTimeout) as ei:
        with window.freeze([a.mountpoint], timeout=0.3, backend=nat) as win:
            took = writable_within(w, 10)  # we hang "forever" inside the window
            assert took is not None, "the guardian did not thaw at the deadline"
    # The body outlived the bound: the with-statement says so, after the thaw.
    assert ei.value.code == 122 and ei.value.window is win
    assert win.guardian == "fired:deadline" and win.error is ei.value
    # Not before the bound: the core's stamps put the guardian's thaw after the deadline it was given.
    assert win.mounts[0].state == "thawed" and win.mounts[0].thaw_start_ns >= win.deadline_ns > win.start_ns


def test_controller_thaws_when_guardian_dies(nat, mounts):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    with pytest.raises(errors.FreezeError) as ei:
        with window.freeze([a.mountpoint], timeout=20, backend=nat) as win:
            gpid = _guardian_pid()
            os.kill(gpid, signal.SIGKILL)
            assert writable_within(w, 10) is not None, "guardian death did not thaw"
    # The window did not hold for the whole body: a snapshot taken in it is not consistent.
    assert ei.value.code == 121 and "guardian died" in ei.value.detail
    assert win.guardian == "lost"


def _guardian_pid() -> int:
    me = str(os.getpid()).encode()
    found = procs_matching(lambda argv: os.path.basename(argv[0]) == b"pyexec-guardian" and argv[1:2] == [me])
    assert found, "no guardian running"
    return found[0]


CONTROLLER = r"""
import sys, time
from pyexec import errors, journal, locks, window
with window.freeze(sys.argv[1:], timeout=60) as w:
    print("frozen", flush=True)
    time.sleep(600)
"""


def test_sigkill_of_controller_inside_window_thaws(nat, mounts, tmp_path):
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    env = {**os.environ, "PYEXEC_RUN_DIR": str(tmp_path / "run"), "PYEXEC_BACKEND": nat.name}
    ctl = subprocess.Popen([sys.executable, "-c", CONTROLLER, a.mountpoint], stdout=subprocess.PIPE, env=env,
                           cwd="/")
    try:
        assert ctl.stdout.readline().strip() == b"frozen"
        c0 = w.count()
        time.sleep(0.1)
        assert w.count() - c0 <= 1, "not frozen"
        ctl.kill()
        took = writable_within(w, 10)
    finally:
        ctl.kill()
        ctl.wait()
    assert took is not None, "killing the controller left the mount frozen"
    # The guardian removed the journal after thawing: nothing is left for `recover`.
    journals = lambda: list((tmp_path / "run").glob("window-*.journal"))
    deadline = time.monotonic() + 5
    while journals() and time.monotonic() < deadline:
        time.sleep(0.01)
    assert journals() == []


HOLDING_CONTROLLER = r"""
import sys, time
from pyexec import window
with window.freeze(sys.argv[1:], timeout=3, hold=True) as w:
    print("frozen", flush=True)
    time.sleep(600)
"""


def test_sigkill_of_a_holding_controller_leaves_the_window_to_its_deadline(nat, mounts, tmp_path):
    """hold=True (a group run's host): the controller's death does not thaw; the guardian thaws at the
    bound, by itself (its stamp is after the deadline), and leaves nothing for recover."""
    a = mounts.make("ext4")
    w = mounts.writer(os.path.join(a.mountpoint, "f"))
    env = {**os.environ, "PYEXEC_RUN_DIR": str(tmp_path / "run"), "PYEXEC_BACKEND": nat.name}
    ctl = subprocess.Popen([sys.executable, "-c", HOLDING_CONTROLLER, a.mountpoint], stdout=subprocess.PIPE,
                           env=env, cwd="/")
    try:
        assert ctl.stdout.readline().strip() == b"frozen"
        page = next((tmp_path / "run").glob("window-*.journal")).read_bytes()
        deadline = native.read_set(page).deadline_ns
        ctl.kill()
        ctl.wait()
        c0 = w.count()
        time.sleep(0.5)
        assert w.count() - c0 <= 1, "the controller's death thawed a window that holds"
        took = writable_within(w, 10)
        thawed_at = nat.now_ns()
    finally:
        ctl.kill()
        ctl.wait()
    assert took is not None, "the guardian did not thaw at the deadline"
    assert thawed_at >= deadline, "thawed before the deadline"
    print(f"writable {took:.3f}s after the controller's death + 0.5s")


DOUBLE_KILL = r"""
import os, signal, sys
from pyexec import errors, journal, locks, native, window
paths = sys.argv[1:]
with window.freeze(paths, timeout=60) as w:
    # Both die inside the window: nobody is left to thaw but the journal.
    os.kill(native.read_set(open(w.journal, "rb").read()).guardian_pid, signal.SIGKILL)
    os.kill(os.getpid(), signal.SIGKILL)
"""


def test_next_freeze_recovers_what_a_dead_run_left_frozen(nat, mounts, run_tmpfs, monkeypatch):
    """Controller and guardian both killed: the journal stays, and the next freeze thaws its mounts first."""
    a, b = mounts.make("ext4"), mounts.make("ext4")
    run_dir = run_tmpfs
    monkeypatch.setattr(journal, "RUN_DIR", str(run_dir))
    env = {**os.environ, "PYEXEC_RUN_DIR": str(run_dir), "PYEXEC_BACKEND": nat.name}
    dead = subprocess.run([sys.executable, "-c", DOUBLE_KILL, b.mountpoint], env=env, cwd="/", timeout=60)
    assert dead.returncode == -signal.SIGKILL
    status = subprocess.run([sys.executable, "-m", "pyexec.cli", "status"], capture_output=True, text=True,
                            env=env, cwd="/", timeout=60)
    assert f"(dead): {b.mountpoint} frozen" in status.stdout, status.stdout + status.stderr
    with window.freeze([a.mountpoint], timeout=20, backend=nat):
        pass
    assert not loopfs.thaw_path(b.mountpoint), "the dead run's mount was not recovered"
    assert list(run_dir.glob("window-*.journal")) == []


def test_foreign_freeze_is_reported_and_left_frozen(nat, mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    subprocess.run(["fsfreeze", "-f", b.mountpoint], check=True)
    with pytest.raises(errors.ForeignFreeze) as ei:
        with window.freeze([a.mountpoint, b.mountpoint], timeout=20, backend=nat):
            pytest.fail("the window must not open")
    assert ei.value.code == 121 and ei.value.path == b.mountpoint
    assert loopfs.thaw_path(b.mountpoint), "the foreign freeze was undone"
    assert not loopfs.thaw_path(a.mountpoint)


def test_unopenable_mount_is_123(nat, tmp_path):
    with pytest.raises(errors.FreezeError) as ei:
        with window.freeze([str(tmp_path / "missing")], backend=nat):
            pass
    assert ei.value.code == 123


def test_nested_freeze_other_filesystem_proceeds_same_one_says_so(nat, mounts):
    a, b = mounts.make("ext4"), mounts.make("ext4")
    with window.freeze([a.mountpoint], timeout=20, backend=nat):
        with window.freeze([b.mountpoint], timeout=20, backend=nat) as inner:
            assert [m.state for m in inner.mounts] == ["frozen"]
        with pytest.raises(errors.FreezeError) as ei:
            with window.freeze([b.mountpoint, a.mountpoint], timeout=20, backend=nat):
                pytest.fail("a nested freeze of a held filesystem must not open")
        assert ei.value.code == 121 and "already holds" in ei.value.detail and a.mountpoint in ei.value.detail
        assert not loopfs.thaw_path(b.mountpoint), "the refused nested freeze left b frozen"
    assert not loopfs.thaw_path(a.mountpoint)


def test_bad_arguments_are_clear_errors(nat, mounts):
    a = mounts.make("ext4")
    for bad in (0, -1, float("nan"), float("inf"), 1e12, "soon"):
        with pytest.raises(ValueError, match="timeout"):
            with window.freeze([a.mountpoint], timeout=bad, backend=nat):
                pytest.fail("must not freeze")
    with pytest.raises(ValueError, match="no mount point"):
        with window.freeze([], backend=nat):
            pass
    with pytest.raises(TypeError, match="list of paths"):
        with window.freeze(a.mountpoint, backend=nat):
            pass
    assert not loopfs.thaw_path(a.mountpoint)


def test_foreign_freeze_during_window_is_left_to_its_owner(nat, mounts):
    a, c = mounts.make("ext4"), mounts.make("ext4")
    with window.freeze([a.mountpoint], timeout=20, backend=nat) as win:
        assert subprocess.run(["fsfreeze", "-f", c.mountpoint]).returncode == 0  # not ours: the tool may
        ours = subprocess.run(["fsfreeze", "-f", a.mountpoint], capture_output=True)
        assert ours.returncode != 0, "a second freeze of our mount must fail (EBUSY)"
    assert win.error is None and [m.state for m in win.mounts] == ["thawed"]
    assert not loopfs.thaw_path(a.mountpoint), "ours was left frozen"
    assert loopfs.thaw_path(c.mountpoint), "the other tool's freeze was undone by our thaw"


def test_foreign_thaw_during_window_is_a_lost_window(nat, mounts):
    """Another tool thawed our freeze inside the window: the window did not hold (121), never app-consistent."""
    a, b = mounts.make("ext4"), mounts.make("ext4")
    with pytest.raises(errors.FreezeError) as ei:
        with window.freeze([a.mountpoint, b.mountpoint], timeout=20, backend=nat) as win:
            subprocess.run(["fsfreeze", "-u", a.mountpoint], check=True)
    assert ei.value.code == 121 and ei.value.path == a.mountpoint and "thawed by another" in ei.value.detail
    assert win.error is ei.value and win.guardian == "idle"
    assert [m.thaw_errno for m in win.mounts] == [errno.EINVAL, 0]  # ours thawed b; a was thawed already
    assert not loopfs.thaw_path(a.mountpoint) and not loopfs.thaw_path(b.mountpoint)


def test_two_runs_at_once_one_freezes_the_other_fails_clearly(mounts, tmp_path):
    a = mounts.make("ext4")
    env = {**os.environ, "PYEXEC_RUN_DIR": str(tmp_path / "run")}
    hc = write_setup(tmp_path)
    cmd = [sys.executable, "-m", "pyexec.cli", "run", "--config", hc, "--mount", a.mountpoint,
           "--snapshot-cmd", "/bin/sleep 1", "--json", "--quiet"]
    runs = [subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, cwd="/")
            for _ in range(2)]
    docs = []
    for p in runs:
        out, err = p.communicate(timeout=60)
        assert b"Traceback" not in err
        docs.append(orjson.loads(out))
    outcomes = sorted((d["outcome"], d["code"]) for d in docs)
    assert outcomes == [("app-consistent", 0), ("failed", 121)], outcomes
    loser = next(d for d in docs if d["code"] == 121)
    assert any("lock" in (p.get("detail") or "") for p in loser["problems"])
    assert not loopfs.thaw_path(a.mountpoint)
