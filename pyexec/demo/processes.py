"""The sandbox servers' processes: each watched through a pidfd so that a signal never reaches a
reused pid, its workers found in /proc, the whole tree killed."""
from __future__ import annotations

import contextlib
import os
import select
import signal

KILL_WAIT_S = 10.0


class Proc:
    """A process we started, watched through a pidfd so that a signal never reaches a reused pid."""

    def __init__(self, pid: int):
        self.pid = pid
        self.fd = os.pidfd_open(pid)

    def alive(self) -> bool:
        """True while the process has not exited."""
        return not select.select([self.fd], [], [], 0)[0]

    def wait(self, timeout: float) -> bool:
        """Wait up to timeout s for the exit; True if it exited."""
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(max(0, int(timeout * 1000))))

    def kill(self, sig: int = signal.SIGKILL) -> None:
        """Signal the process (nothing if it is gone)."""
        with contextlib.suppress(ProcessLookupError):
            signal.pidfd_send_signal(self.fd, sig)

    def close(self) -> None:
        """Release the pidfd."""
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def works_in(pid: int, directory: str) -> bool:
    """True if process pid's working directory is directory (a postmaster works in its data
    directory: a pid file's pid that does not is another process's, the pid reused)."""
    try:
        return os.readlink(f"/proc/{pid}/cwd") == os.path.realpath(directory)
    except OSError:
        return False


def _children(ppid: int) -> list[int]:
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    if int(f.read().rpartition(b")")[2].split()[1]) == ppid:
                        out.append(int(d))
            except (OSError, ValueError, IndexError):
                continue
    return out


def kill_tree(proc: Proc) -> None:
    """SIGKILL a server and its worker processes, and wait for them all to be gone."""
    kids = []
    for pid in _children(proc.pid):
        with contextlib.suppress(OSError):
            k = Proc(pid)
            # The pidfd pins the pid: if it is still our server's child now, it is a worker.
            if pid in _children(proc.pid):
                kids.append(k)
            else:
                k.close()
    proc.kill()
    for k in kids:
        k.kill()
    for p in [proc, *kids]:
        p.wait(KILL_WAIT_S)
    for k in kids:
        k.close()
