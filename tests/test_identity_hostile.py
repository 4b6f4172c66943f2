"""A local user cannot redirect a freeze by swapping a path (issue 19, attacks 1 and 2), recover thaws only
the filesystem a dead run froze and does not trust a reused pid, and a thaw by someone else inside the
window is a lost window.  The attacker is a real unprivileged account (the local_user fixture) acting
through its own processes on real loop filesystems; nothing is left frozen."""
from __future__ import annotations

import contextlib
import functools
import os
import signal
import subprocess
import sys
import time

import orjson
import pytest
from helpers import needs_root
from test_config_trust import write_setup
from test_freeze_window import writable_within
from test_promises import is_frozen

from pyexec import errors, host, journal, kernel, native, window
from pyexec.demo import loopfs

pytestmark = needs_root

PYEXEC = [sys.executable, "-m", "pyexec.cli"]

# The attacker's process: once the pre-script has started (its trigger), rename the directory above
# the mount point and put a symlink to another filesystem's parent directory in its place.
SWAPPER = """
while [ ! -e trigger ]; do sleep 0.02; done
mv sub old && ln -s "$1" sub && touch swapped
touch done
"""
# The pre-script (root's, trusted): start the attack and give it time to finish (bounded).
PRE = """#!/bin/sh
touch {home}/trigger
i=0
while [ ! -e {home}/done ] && [ $i -lt 500 ]; do sleep 0.02; i=$((i+1)); done
echo pre
"""


@contextlib.contextmanager
def swap_attack(local_user, target_parent):
    """The user owns HOME/sub (above the mount point HOME/sub/mnt) and waits to swap it for a symlink to
    target_parent during the pre-scripts.  Undone afterwards, so the fixture unmounts what it mounted."""
    home = local_user.home
    (home / "sub").mkdir()
    local_user.chown(home / "sub")
    proc = local_user.popen(["sh", "-c", SWAPPER, "swapper", str(target_parent)])
    try:
        yield home / "sub" / "mnt"
    finally:
        proc.kill()
        proc.wait(timeout=10)
        if (home / "sub").is_symlink():
            os.unlink(home / "sub")
        if (home / "old").is_dir():
            os.rename(home / "old", home / "sub")


def test_swap_during_pre_scripts_is_refused_and_nothing_frozen(local_user, mounts, tmp_path):
    """Attack 1: the user swaps the directory above the planned mount for a symlink to another
    filesystem's parent while the pre-script runs.  The run refuses (123) before any FIFREEZE: B, the
    user's choice, is never frozen, A is not left frozen, the post-script runs."""
    (tmp_path / "elsewhere").mkdir()
    b = mounts.make("ext4", mountpoint=tmp_path / "elsewhere" / "mnt")
    wb = mounts.writer(os.path.join(b.mountpoint, "f"))
    with swap_attack(local_user, tmp_path / "elsewhere") as planned:
        a = mounts.make("ext4", mountpoint=planned)
        hc = write_setup(tmp_path, pre=PRE.format(home=local_user.home).encode())
        taken = []
        rep = host.run(hc, mount_points=[a.mountpoint], snapshot=taken.append, freeze_timeout=5)
        assert (local_user.home / "swapped").exists(), "the attack did not run"
        assert os.path.realpath(a.mountpoint) == b.mountpoint, "the path now names B"
    assert rep.code == 123 and rep.outcome == host.FAILED and taken == [], rep
    assert "moved to" in rep.check_errors[-1].detail and rep.check_errors[-1].path == a.mountpoint
    assert rep.window is None, "the refusal comes before any FIFREEZE"
    assert [r.ok for r in rep.post] == [True] and rep.post[0].stdout.data == b"post\n"
    assert writable_within(wb, 10) is not None
    assert not is_frozen(b.mountpoint) and not is_frozen(a.mountpoint)


def test_symlink_on_the_way_to_a_mount_point_is_never_followed(local_user, mounts, tmp_path, monkeypatch):
    """A mount point named through the user's symlink is refused by the no-symlink open, with openat2
    and with the walk that replaces it on kernels before 5.6 (the probe forced off)."""
    (tmp_path / "elsewhere").mkdir()
    b = mounts.make("ext4", mountpoint=tmp_path / "elsewhere" / "mnt")
    r = local_user.run(["ln", "-s", str(tmp_path / "elsewhere"), "sub"])
    assert r.returncode == 0, r.stderr
    through = str(local_user.home / "sub" / "mnt")
    probed = kernel.features()
    for forced in (probed["openat2"], False):
        monkeypatch.setattr(kernel, "features", functools.partial(dict, probed, openat2=forced))
        with pytest.raises(errors.FreezeError) as ei:
            with window.window([through], 5):
                pass
        assert ei.value.code == 123 and "symlink" in ei.value.detail, ei.value
    assert not is_frozen(b.mountpoint)


def test_swap_onto_the_run_directory_is_refused(local_user, mounts, tmp_path):
    """Attack 2: the run directory on a loop filesystem R (not tmpfs), and the same swap pointing the
    freeze at R.  Refused before any FIFREEZE: nothing is frozen, the run ends."""
    (tmp_path / "rparent").mkdir()
    r = mounts.make("ext4", mountpoint=tmp_path / "rparent" / "mnt")
    run_dir = os.path.join(r.mountpoint, "run")
    wr = mounts.writer(os.path.join(r.mountpoint, "f"))
    with swap_attack(local_user, tmp_path / "rparent") as planned:
        a = mounts.make("ext4", mountpoint=planned)
        hc = write_setup(tmp_path, pre=PRE.format(home=local_user.home).encode())
        p = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", a.mountpoint, "--freeze-timeout", "5",
                            "--json", "--quiet"], env={**os.environ, "PYEXEC_RUN_DIR": run_dir},
                           capture_output=True, cwd="/", timeout=120)
        assert (local_user.home / "swapped").exists(), "the attack did not run"
    doc = orjson.loads(p.stdout)
    assert p.returncode != 0 and doc["code"] == 123 and doc["outcome"] == "failed", doc
    assert doc["window"] is None and b"Traceback" not in p.stderr
    assert writable_within(wr, 10) is not None
    assert not is_frozen(r.mountpoint) and not is_frozen(a.mountpoint)


def test_run_directory_frozen_by_another_cannot_stall_the_guardian(mounts, tmp_path):
    """The run directory on a disk filesystem R (as /run is on `/` here): the journal page is kept in
    memory (said in the report), so when another tool freezes R inside our window the guardian still
    thaws ours at the bound (a page of a file on R would block it, and the controller, in page_mkwrite)."""
    (tmp_path / "rparent").mkdir()
    r = mounts.make("ext4", mountpoint=tmp_path / "rparent" / "mnt")
    a = mounts.make("ext4")
    wa = mounts.writer(os.path.join(a.mountpoint, "f"))
    hc = write_setup(tmp_path)
    cmd = [*PYEXEC, "run", "--config", hc, "--mount", a.mountpoint, "--freeze-timeout", "3", "--json",
           "--quiet", "--snapshot-cmd", f"/bin/sh -c 'fsfreeze -f {r.mountpoint} && exec sleep 60'"]
    ctl = subprocess.Popen(cmd, env={**os.environ, "PYEXEC_RUN_DIR": os.path.join(r.mountpoint, "run")},
                           stdout=subprocess.PIPE, cwd="/")
    try:
        deadline = time.monotonic() + 20
        while not (is_frozen(a.mountpoint) and is_frozen(r.mountpoint)):
            assert time.monotonic() < deadline and ctl.poll() is None, "the window never began"
        # The controller stopped, its own thaw at the bound (the snapshot command's deadline) cannot
        # race the guardian's: a thaw now is the guardian's alone, whatever the load.
        os.kill(ctl.pid, signal.SIGSTOP)
        # Past the bound, with R still frozen by the other tool: ours must be thawed by the guardian.
        assert writable_within(wa, 20) is not None, "the guardian was stalled by the frozen run directory"
        assert subprocess.run(["fsfreeze", "-f", r.mountpoint], capture_output=True).returncode != 0, \
            "R should still be frozen by the other tool (EBUSY)"
    finally:
        os.kill(ctl.pid, signal.SIGCONT)
        loopfs.thaw_path(r.mountpoint)
        out, _ = ctl.communicate(timeout=60)
    doc = orjson.loads(out)
    assert doc["code"] == 122 and doc["window"]["guardian"] == "fired:deadline", doc
    assert doc["window"]["journal_page"] == "memory" and any("not on tmpfs" in w for w in doc["warnings"])
    assert not is_frozen(a.mountpoint) and not is_frozen(r.mountpoint)


def test_non_tmpfs_run_directory_still_freezes(mounts, tmp_path):
    """The fallback is a working window: app-consistent, the page in memory, the journal removed."""
    (tmp_path / "rparent").mkdir()
    r = mounts.make("ext4", mountpoint=tmp_path / "rparent" / "mnt")
    a = mounts.make("ext4")
    hc = write_setup(tmp_path)
    p = subprocess.run([*PYEXEC, "run", "--config", hc, "--mount", a.mountpoint, "--json", "--quiet"],
                       env={**os.environ, "PYEXEC_RUN_DIR": os.path.join(r.mountpoint, "run")},
                       capture_output=True, cwd="/", timeout=120)
    doc = orjson.loads(p.stdout)
    assert p.returncode == 0 and doc["outcome"] == "app-consistent", doc
    assert doc["window"]["journal_page"] == "memory" and doc["window"]["mounts"][0]["state"] == "thawed"
    assert [f for f in os.listdir(os.path.join(r.mountpoint, "run")) if f.endswith(".journal")] == []


HELD = r"""
import sys, time
from pyexec import window
with window.freeze(sys.argv[1:], timeout=120, presync=False) as w:
    print(w.journal, flush=True)
    time.sleep(600)
"""


def double_kill(paths: list[str], run_dir) -> str:
    """A run frozen over paths whose controller and guardian are both SIGKILLed (the guardian stopped
    first, so it cannot thaw): returns the journal it leaves."""
    ctl = subprocess.Popen([sys.executable, "-c", HELD, *paths], env={**os.environ, "PYEXEC_RUN_DIR": str(run_dir)},
                           stdout=subprocess.PIPE, cwd="/", text=True)
    try:
        path = ctl.stdout.readline().strip()
        gpid = native.read_set(open(path, "rb").read()).guardian_pid
        os.kill(gpid, signal.SIGSTOP)
        ctl.kill()
        ctl.wait(timeout=30)
        os.kill(gpid, signal.SIGKILL)
    finally:
        ctl.kill()
        ctl.wait(timeout=30)
    deadline = time.monotonic() + 10
    while os.path.exists(f"/proc/{gpid}"):
        assert time.monotonic() < deadline, "the guardian did not die"
        time.sleep(0.01)
    return path


def recover(run_dir) -> str:
    r = subprocess.run([*PYEXEC, "recover"], env={**os.environ, "PYEXEC_RUN_DIR": str(run_dir)}, cwd="/",
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return r.stdout


def test_recover_thaws_only_the_filesystem_the_run_froze(mounts, run_tmpfs):
    """A dead run left A and C frozen; then another filesystem B is mounted over A's mount point and
    frozen by another tool.  recover thaws C, never B (the path's identity changed), and keeps the
    journal; once B is gone, the next recover thaws A, found again at its path."""
    a, c = mounts.make("ext4"), mounts.make("ext4")
    j = double_kill([a.mountpoint, c.mountpoint], run_tmpfs)
    assert is_frozen(a.mountpoint) and is_frozen(c.mountpoint)
    b = mounts.make("ext4", mountpoint=a.mountpoint)  # over frozen A, which stays frozen beneath
    subprocess.run(["fsfreeze", "-f", b.mountpoint], check=True)
    out = recover(run_tmpfs)
    assert f"thawed {c.mountpoint}" in out and f"thawed {a.mountpoint}" not in out, out
    assert "left frozen" in out and os.path.exists(j), out
    assert not is_frozen(c.mountpoint)
    assert loopfs.thaw_path(b.mountpoint), "recover thawed B, another tool's freeze of another filesystem"
    b.close()  # B goes away: the path is A again
    assert is_frozen(a.mountpoint), "A, hidden under B, must have stayed as it was"
    out = recover(run_tmpfs)
    assert f"thawed {a.mountpoint}" in out, out
    assert not os.path.exists(j) and not is_frozen(a.mountpoint)


def test_a_reused_pid_does_not_keep_a_dead_run_frozen(mounts, run_tmpfs):
    """The journal names a pid that runs again, but as another process (another start time): the
    run is dead, and recover thaws its filesystem."""
    a = mounts.make("ext4")
    j = double_kill([a.mountpoint], run_tmpfs)
    size = native.default().set_size
    data = open(j, "rb").read()
    meta = orjson.loads(data[size:].rstrip(b"\0"))
    other = subprocess.Popen(["sleep", "60"])
    try:
        assert journal.start_time(other.pid) != meta["start"]
        meta["pid"] = meta["guardian_pid"] = other.pid  # as if both pids had been given to `sleep`
        with open(j, "wb") as f:
            f.write(data[:size] + orjson.dumps(meta))
        out = recover(run_tmpfs)
    finally:
        other.kill()
        other.wait()
    assert f"thawed {a.mountpoint}" in out and "still running" not in out, out
    assert not is_frozen(a.mountpoint) and not os.path.exists(j)


def test_foreign_thaw_during_the_snapshot_is_not_app_consistent(mounts, tmp_path):
    """Another tool thaws our mount during the snapshot: the window did not hold, so the run is not
    app-consistent and its code says so (121, naming the mount); the post-script still runs."""
    a = mounts.make("ext4")
    hc = write_setup(tmp_path)
    rep = host.run(hc, mount_points=[a.mountpoint], snapshot=["fsfreeze", "-u", a.mountpoint], freeze_timeout=20)
    assert rep.snapshot_run is not None and rep.snapshot_run.ok, "the foreign thaw must have succeeded"
    assert rep.outcome != host.APP and rep.code == 121, rep
    assert rep.check_errors[-1].path == a.mountpoint and "thawed by another" in rep.check_errors[-1].detail
    assert [r.ok for r in rep.post] == [True]
    assert not is_frozen(a.mountpoint)


def test_mount_named_through_a_users_symlink_is_refused_before_any_script(local_user, mounts, tmp_path):
    """The swap done before the run: the configured mount point now resolves through the user's symlink
    to another filesystem.  Refused when planned (123), before any pre-script; nothing frozen."""
    (tmp_path / "elsewhere").mkdir()
    b = mounts.make("ext4", mountpoint=tmp_path / "elsewhere" / "mnt")
    r = local_user.run(["ln", "-s", str(tmp_path / "elsewhere"), "sub"])
    assert r.returncode == 0, r.stderr
    hc = write_setup(tmp_path)
    rep = host.run(hc, mount_points=[str(local_user.home / "sub" / "mnt")], freeze_timeout=5)
    assert rep.code == 123 and rep.outcome == host.FAILED and rep.pre == [] and rep.window is None, rep
    assert "symlink" in rep.check_errors[-1].detail and f"uid {local_user.uid}" in rep.check_errors[-1].detail
    assert not is_frozen(b.mountpoint)


def test_a_journal_its_run_never_wrote_is_removed_by_recover(tmp_path):
    """A run killed as it made its journal (the file created, nothing in it yet; or only the zeroed
    page of a tmpfs journal) froze nothing: status names its dead pid, recover removes it, thaws nothing;
    a journal with a freeze set but unreadable metadata is left alone."""
    run_dir = tmp_path / "run"
    run_dir.mkdir(mode=0o700)
    dead = subprocess.Popen(["true"])
    dead.wait()
    size = native.default().set_size
    (run_dir / f"window-{dead.pid}-0.journal").write_bytes(b"")
    (run_dir / f"window-{dead.pid}-1.journal").write_bytes(b"\0" * size)
    page = bytearray(size)
    native.default().set_init(page, [])
    (run_dir / f"window-{dead.pid}-2.journal").write_bytes(bytes(page) + b"{not json")
    env = {**os.environ, "PYEXEC_RUN_DIR": str(run_dir)}
    st = subprocess.run([*PYEXEC, "status"], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert st.stdout.count(f"pid {dead.pid} (dead)") == 2, st.stdout
    r = subprocess.run([*PYEXEC, "recover"], env=env, cwd="/", capture_output=True, text=True, timeout=60)
    assert r.returncode == 0 and r.stdout.rstrip().endswith("recover: 0 filesystem(s) thawed"), r.stdout + r.stderr
    assert sorted(os.listdir(run_dir)) == [f"window-{dead.pid}-2.journal"]
