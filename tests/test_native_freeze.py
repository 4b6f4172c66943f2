"""The native freeze set on real loop-mounted filesystems, through both bindings."""
from __future__ import annotations

import errno
import os
import subprocess
import time

import pytest
from helpers import needs_btrfs, needs_root, needs_xfs

from pyexec import native
from pyexec.demo import loopfs

pytestmark = needs_root

RCU = "/sys/kernel/rcu_expedited"


def open_dir(path: str) -> int:
    return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)


def is_frozen(path: str) -> bool:
    """True if path was frozen (probing thaws it, so callers re-freeze if they need to)."""
    return loopfs.thaw_path(path)


def wait_progress(writer, since: int, timeout: float = 10.0) -> int:
    deadline = time.monotonic() + timeout
    while (now := writer.count()) <= since + 1:
        assert time.monotonic() < deadline, "writer made no progress after thaw"
        time.sleep(0.002)
    return now


FSTYPES = ["ext4", pytest.param("xfs", marks=needs_xfs), pytest.param("btrfs", marks=needs_btrfs)]
FLAGS = [0, native.FREEZE_EXPEDITE | native.FREEZE_PRESYNC]


@pytest.mark.parametrize("flags", FLAGS, ids=["plain", "expedite+presync"])
@pytest.mark.parametrize("fstype", FSTYPES)
def test_freeze_stops_writer_and_thaw_resumes(nat, mounts, fstype, flags):
    m = mounts.make(fstype)
    w = mounts.writer(os.path.join(m.mountpoint, "data"))
    rcu_before = open(RCU).read().strip() if os.path.exists(RCU) else None
    fd = open_dir(m.mountpoint)
    try:
        buf = nat.new_set()
        assert nat.set_init(buf, [fd]) == 0
        t_before = time.monotonic_ns()  # Python's CLOCK_MONOTONIC, the clock the core's stamps promise
        assert nat.freeze(buf, flags) == 0
        rec = native.read_set(buf)
        assert rec.phase == "frozen" and rec.mounts[0].state == "frozen"
        # A writer stalls on the frozen superblock: at most the write in flight completes.
        c0 = w.count()
        time.sleep(0.3)
        stalled = w.count()
        assert stalled - c0 <= 1
        assert nat.thaw(buf) == 0
        t_after = time.monotonic_ns()
        resumed = wait_progress(w, stalled)
    finally:
        os.close(fd)
    assert resumed > stalled + 1
    rec = native.read_set(buf)
    mr = rec.mounts[0]
    assert rec.phase == "done" and mr.state == "thawed"
    assert mr.freeze_errno == mr.thaw_errno == 0
    stamps = [rec.window_start_ns, mr.freeze_start_ns, mr.freeze_end_ns, mr.thaw_start_ns, mr.thaw_end_ns,
              rec.window_end_ns]
    assert stamps == sorted(stamps) and stamps[0] > 0
    # The window held the 0.3 s sleep, and its stamps are the core's CLOCK_MONOTONIC of this test's
    # own span (a stamp of another clock, or garbage, falls outside it): an ordering, not a speed.
    assert 0.3e9 <= rec.window_end_ns - rec.window_start_ns
    assert t_before <= rec.window_start_ns and rec.window_end_ns <= t_after
    if flags & native.FREEZE_PRESYNC:
        assert 0 < mr.sync_start_ns <= mr.sync_end_ns <= mr.freeze_start_ns and mr.sync_errno == 0
    else:
        assert mr.sync_start_ns == 0
    if rcu_before is not None:
        assert open(RCU).read().strip() == rcu_before, "rcu_expedited was not put back"
        if flags & native.FREEZE_EXPEDITE:
            assert rec.rcu_state in ("restored", "already", "skipped")
            if rcu_before == "0" and os.access(RCU, os.W_OK):
                assert rec.rcu_state == "restored" and rec.rcu_prev == 0
        else:
            assert rec.rcu_state == "untouched"


@needs_xfs
def test_partial_failure_thaws_only_what_it_froze(nat, mounts, tmp_path):
    ext4 = mounts.make("ext4")
    xfs = mounts.make("xfs")
    tmpfs = tmp_path / "tmpfs"
    tmpfs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "none", str(tmpfs)], check=True)
    fds = [open_dir(ext4.mountpoint), open_dir(str(tmpfs)), open_dir(xfs.mountpoint)]
    try:
        buf = nat.new_set()
        nat.set_init(buf, fds)
        rc = nat.freeze(buf, native.FREEZE_EXPEDITE)
        rec = native.read_set(buf)
    finally:
        for fd in fds:
            os.close(fd)
        subprocess.run(["umount", str(tmpfs)], check=True)
    assert rc == -errno.EOPNOTSUPP
    assert rec.failed_index == 1 and rec.failed_errno == errno.EOPNOTSUPP
    assert [m.state for m in rec.mounts] == ["thawed", "failed", "idle"]
    assert rec.mounts[2].freeze_start_ns == 0, "xfs must never have been frozen"
    assert rec.mounts[0].thaw_end_ns >= rec.mounts[1].freeze_end_ns
    assert not is_frozen(ext4.mountpoint) and not is_frozen(xfs.mountpoint)


def test_foreign_freeze_is_reported_and_left_alone(nat, mounts):
    ours = mounts.make("ext4")
    theirs = mounts.make("ext4")
    subprocess.run(["fsfreeze", "-f", theirs.mountpoint], check=True)
    fds = [open_dir(ours.mountpoint), open_dir(theirs.mountpoint)]
    try:
        buf = nat.new_set()
        nat.set_init(buf, fds)
        rc = nat.freeze(buf, 0)
        rec = native.read_set(buf)
        assert nat.thaw(buf) == 0  # nothing of ours is left frozen: a no-op
    finally:
        for fd in fds:
            os.close(fd)
    assert rc == -errno.EBUSY
    assert [m.state for m in rec.mounts] == ["thawed", "busy"]
    assert rec.mounts[1].thaw_start_ns == 0, "a foreign freeze must never be thawed by us"
    assert is_frozen(theirs.mountpoint), "the foreign freeze was undone"
    assert not is_frozen(ours.mountpoint)


def test_thaw_reports_every_errno_and_tries_every_mount(nat, mounts):
    a = mounts.make("ext4")
    b = mounts.make("ext4")
    fds = [open_dir(a.mountpoint), open_dir(b.mountpoint)]
    try:
        buf = nat.new_set()
        nat.set_init(buf, fds)
        assert nat.freeze(buf, 0) == 0
        # Someone thaws b behind our back: our FITHAW of b fails with EINVAL, a is still thawed.
        subprocess.run(["fsfreeze", "-u", b.mountpoint], check=True)
        rc = nat.thaw(buf)
        rec = native.read_set(buf)
    finally:
        for fd in fds:
            os.close(fd)
    assert rc == -errno.EINVAL
    assert [m.thaw_errno for m in rec.mounts] == [0, errno.EINVAL]
    assert [m.state for m in rec.mounts] == ["thawed", "thawed"]
    # Reverse order: b (last frozen) is thawed first.
    assert rec.mounts[1].thaw_start_ns < rec.mounts[0].thaw_start_ns
    assert not is_frozen(a.mountpoint)


def test_too_many_mounts_refused(nat):
    buf = nat.new_set()
    assert nat.set_init(buf, [0] * (nat.max_mounts + 1)) == -errno.E2BIG
