"""The thaw guardian of one window: the C program (native/guardian.c) that thaws what the controller
froze if the controller dies or overruns, and the thread that thaws if the guardian dies."""
from __future__ import annotations

import contextlib
import os
import threading

from pyexec import cgroups, native, waits

GUARDIAN = os.path.join(os.path.dirname(__file__), "pyexec-guardian")


class Guardian:
    """The guardian process of one window and a thread that thaws if it dies."""

    def __init__(self, nat: native.Native, page: native.SetBuffer, page_fd: int, journal: str):
        self.nat = nat
        # In pyexec's own cgroup (cgroups.py): a kill or freeze of the caller's does not reach it.
        with cgroups.helper_cgroups() as (fds, parents):
            self.proc = nat.spawn_helper([GUARDIAN, str(os.getpid()), str(native.life_fd()), journal, *parents],
                                         GUARDIAN, exec_fd=page_fd, cgroup_fds=fds)
        self.page = page
        self.lost = False
        self._stop_r, self._stop_w = os.pipe2(os.O_CLOEXEC)
        self._thread = threading.Thread(target=self._watch, name="pyexec-guardian-watch", daemon=True)
        self._thread.start()

    def _watch(self) -> None:
        if self.proc.pidfd in waits.wait_readable([self.proc.pidfd, self._stop_r], None, nat=self.nat):
            self.lost = True
            # px_freeze reads this after each FIFREEZE and undoes what it froze; the thaw
            # here skips a mount whose FIFREEZE is in flight (it would wait behind it).
            if native.read_set(self.page).guardian_state < native.G_FIRED_DEADLINE:
                native.set_header(self.page, guardian_state=native.G_LOST)
            self.nat.thaw(self.page)

    def stop(self) -> None:
        """End the watch, then the guardian, and reap it."""
        os.write(self._stop_w, b"x")
        self._thread.join()
        with contextlib.suppress(OSError):
            self.nat.kill_tree(self.proc, 0, self.nat.kill_wait_ns)
        self.proc.close()
        os.close(self._stop_r)
        os.close(self._stop_w)


def wait_ready(page: native.SetBuffer, proc: native.Proc, timeout_s: float = 5.0) -> bool:
    """Wait for the guardian's ready byte on its stdout (or its death, or timeout_s)."""
    if proc.out_fd in waits.wait_readable([proc.out_fd, proc.pidfd], waits.deadline_after(timeout_s)):
        os.read(proc.out_fd, 1)
    return native.read_set(page).guardian_state >= native.G_READY
