"""What pyexec is measured against: a plugin host that works the way the reference does, and a probe
that feels a freeze the way an application does.

PollingHost: scripts run as `sh PATH` through subprocess and are watched with a sleep-poll loop
(`ScriptsExecutionPollTimeSeconds`, 1 s or 3 s); optionally the reference's fixed 3 s sleep before
freezing; the freeze through util-linux `fsfreeze`; the end of the snapshot noticed on the next poll.
Unlike the reference it kills a timed-out script (at the first poll past the deadline), so that its
timeout precision can be measured at all."""
from __future__ import annotations

import mmap
import os
import signal
import struct
import subprocess
import sys
import time


class PollingHost:
    """The reference's orchestration: subprocess + sleep-poll, util-linux fsfreeze."""

    def __init__(self, poll_s: float, freeze_delay_s: float = 0.0):
        self.poll_s = poll_s
        self.freeze_delay_s = freeze_delay_s

    def run_script(self, path: str, timeout_s: float) -> tuple[int | None, float]:
        """(exit status or None on timeout, monotonic time the script was gone)."""
        p = subprocess.Popen(["sh", path], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                             start_new_session=True)
        t0 = time.monotonic()
        while p.poll() is None:
            if time.monotonic() - t0 >= timeout_s:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()
                return None, time.monotonic()
            time.sleep(self.poll_s)
        return p.returncode, time.monotonic()

    def freeze_thaw(self, mount_points: list[str], snapshot=lambda: None) -> None:
        """fsfreeze -f each, the snapshot, wait for the next poll, fsfreeze -u each in reverse."""
        for m in mount_points:
            subprocess.run(["fsfreeze", "-f", m], check=True)
        try:
            snapshot()
            time.sleep(self.poll_s)  # the reference learns that the snapshot is done on its next poll
        finally:
            for m in reversed(mount_points):
                subprocess.run(["fsfreeze", "-u", m], check=False)

    def run(self, pre: str, post: str, mount_points: list[str], timeout_s: float = 30) -> None:
        """pre-script, the fixed delay, freeze + snapshot + thaw, post-script."""
        self.run_script(pre, timeout_s)
        time.sleep(self.freeze_delay_s)
        self.freeze_thaw(mount_points)
        self.run_script(post, timeout_s)


PROBE_CODE = r"""
import mmap, os, struct, sys, time
path, shm = sys.argv[1], sys.argv[2]
fd = os.open(shm, os.O_RDWR)
m = mmap.mmap(fd, 24)
out = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
block = b"p" * 4096
n = worst = 0
now = time.monotonic_ns
last = now()
while True:
    os.pwrite(out, block, (n % 64) * 4096)
    t = now()
    n += 1
    if struct.unpack_from("=Q", m, 16)[0]:
        worst = 0
        struct.pack_into("=Q", m, 16, 0)
    elif t - last > worst:
        worst = t - last
    last = t
    struct.pack_into("=QQ", m, 0, n, worst)
"""


class StallProbe:
    """A process writing 4 KiB blocks to a file in a tight loop; `worst_gap_ns` is the longest time
    between two completed writes since `reset()`: the freeze window as the application feels it."""

    def __init__(self, path: str, shm_path: str):
        with open(shm_path, "wb") as f:
            f.write(b"\0" * 24)
        fd = os.open(shm_path, os.O_RDWR)
        self.map = mmap.mmap(fd, 24)
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE_CODE, path, shm_path])
        self.wait_writes(10)

    def count(self) -> int:
        return struct.unpack_from("=Q", self.map, 0)[0]

    def wait_writes(self, n: int, timeout: float = 10) -> None:
        """Block until the probe has completed n more writes."""
        target = self.count() + n
        deadline = time.monotonic() + timeout
        while self.count() < target:
            if time.monotonic() > deadline:
                raise TimeoutError("the probe stopped writing")
            time.sleep(0.0005)

    def reset(self) -> None:
        struct.pack_into("=Q", self.map, 16, 1)
        while struct.unpack_from("=Q", self.map, 16)[0]:
            time.sleep(0.0002)

    def worst_gap_ns(self) -> int:
        return struct.unpack_from("=Q", self.map, 8)[0]

    def close(self) -> None:
        self.proc.kill()
        self.proc.wait()
