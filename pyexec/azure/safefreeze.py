"""`safefreeze TIMEOUT_SECONDS MOUNT...`: the reference freeze helper's protocol over pyexec's window.

Freeze the mounts, send SIGUSR1 to the parent, then wait (event-driven: one poll on a signal
wake-up pipe and the parent's pidfd) for SIGUSR1 (thaw, exit 0), another thaw signal, the
parent's death or the timeout (thaw, exit 1).  The guardian of `freeze` bounds the window even
if this process is killed.  Nothing is printed while the mounts are frozen.

The caller (the extension's fsfreezer.py) reads stdout only after the exit: a line containing
`Failed to open:` makes it report 123 instead of 121, and it reads exit status 2 as "unable to
sleep", so every failure here, a usage error included, is exit 1 with its reason on stdout."""
from __future__ import annotations

import dataclasses
import errno
import os
import signal

from pyexec import errors, limits, native, signals, waits, window

EXIT_THAWED, EXIT_FAILED = 0, 1
USAGE = "Usage: safefreeze TimeoutInSeconds MountPoint1 [MountPoint2 [MountPoint3 [..]]]"
# The reference's handled set; every one of them ends the window here.
THAW_SIGNALS = (signal.SIGUSR1, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT, signal.SIGABRT, signal.SIGPIPE,
                signal.SIGTERM, signal.SIGUSR2, signal.SIGTSTP, signal.SIGTTIN, signal.SIGTTOU)
# Sent by the kernel when the parent dies, where there is no pidfd to watch it (PR_SET_PDEATHSIG).
PARENT_DIED = signal.SIGRTMIN
# The guardian's bound sits past ours so that on time we thaw ourselves and it fires only if we hang.
GUARDIAN_SLACK_S = 0.5


@dataclasses.dataclass
class Result:
    """How one safefreeze ended: exit status, why, and the lines to print (on stdout) after the thaw."""

    status: int
    reason: str
    lines: list[str] = dataclasses.field(default_factory=list)


def parse_args(argv: list[str]) -> tuple[float, list[str]]:
    """(timeout, mounts) from the command line; ValueError saying what is wrong."""
    if len(argv) < 2:
        raise ValueError("a timeout and at least one mount point are required")
    return limits.check_timeout(argv[0], "the timeout"), argv[1:]


def _protocol_line(err: errors.PyexecError) -> list[str]:
    # The reference helper's own words for a mount it cannot use; the caller greps for the first.
    if err.code == 123 and err.path is not None:
        if getattr(err, "errno", 0) == errno.ENOTDIR:
            return [f"Path not a directory: {err.path}"]
        return [f"Failed to open: {err.path}"]
    return []


def _catch_signals() -> signals.Cancel:
    """THAW_SIGNALS and PARENT_DIED, each a byte on the returned scope's fd (signals.Cancel); THAW_SIGNALS
    unblocked, since a parent that blocked SIGUSR1 to sigwait for it passes the mask on through exec."""
    return signals.Cancel(signals=(*THAW_SIGNALS, PARENT_DIED), unblock=THAW_SIGNALS)


def _watch_parent(ppid: int) -> int:
    """The parent's pidfd; where the kernel has no pidfd_open (before 5.3), -1, and the kernel
    sends PARENT_DIED when the parent dies instead (PR_SET_PDEATHSIG; it fires when the thread
    that started us ends, which for the extension is its main thread).  OSError ESRCH if it is
    gone already."""
    return native.default().watch_parent(ppid, death_sig=PARENT_DIED)


def _wait_for_thaw(sig: signals.Cancel, parent_fd: int, timeout_s: float) -> str:
    """Block until a thaw signal, the parent's exit or the timeout; say which."""
    ready = waits.wait_readable([sig.fd, parent_fd], waits.deadline_after(timeout_s))
    if not ready:
        return "timeout"
    first = sig.first()
    if first is None or first == PARENT_DIED:
        return "parent-died"
    return signal.Signals(first).name


def run(timeout_s: float, paths: list[str], expedite: bool = True) -> Result:
    """The whole protocol; never raises for a failed freeze (it becomes status 1 and a line)."""
    ppid = os.getppid()
    res = Result(EXIT_FAILED, "")
    with _catch_signals() as sig:
        try:
            parent_fd = _watch_parent(ppid)
        except OSError as err:
            if err.errno == errno.ESRCH:  # it died before the watch began
                return Result(EXIT_FAILED, "the parent process exited before the freeze")
            return Result(EXIT_FAILED, f"cannot watch the parent process {ppid}: {err.strerror}")
        try:
            try:
                with window.freeze(paths, timeout=min(timeout_s + GUARDIAN_SLACK_S, limits.MAX_TIMEOUT),
                                   expedite=expedite) as win:
                    try:
                        os.kill(ppid, signal.SIGUSR1)
                    except OSError as err:
                        res.reason = f"failed to send SIGUSR1 to the parent {ppid}: {err.strerror}"
                    else:
                        res.reason = _wait_for_thaw(sig, parent_fd, timeout_s)
            except errors.PyexecError as e:
                res.reason = e.describe()
                res.lines = _protocol_line(e)
                return res
        finally:
            if parent_fd >= 0:
                os.close(parent_fd)
    if win.error is not None:
        res.reason = f"{res.reason}; {win.error.describe()}"
    elif res.reason == "SIGUSR1":
        res.status = EXIT_THAWED
    res.lines = [f"safefreeze: {m.path}: {m.state}" + (f" (thaw errno {m.thaw_errno})" if m.thaw_errno else "")
                 for m in win.mounts]
    res.lines.append(f"safefreeze: window {win.length_ns / 1e6:.3f} ms, ended by {res.reason}")
    return res
