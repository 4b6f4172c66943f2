"""The one deadline wait of pyexec's Python side: fds, an absolute deadline on the core's monotonic
clock (`native.Native.now_ns`, CLOCK_MONOTONIC ns) and a cancel fd, in one poll; woken by an fd or by
the deadline, never by a timer tick.  (The native waits, px_wait and the C programs', are ppolls on
the same clock.)"""
from __future__ import annotations

import select
from collections.abc import Sequence

from pyexec import native

_NS_PER_MS = 1_000_000


def deadline_after(seconds: float, nat: native.Native | None = None) -> int:
    """The deadline seconds from now on the core's monotonic clock, in ns."""
    return (nat or native.default()).now_ns() + native.ns_from_s(seconds)


def wait_readable(fds: Sequence[int], deadline_ns: int | None, cancel_fd: int = -1,
                  nat: native.Native | None = None) -> list[int]:
    """Block until one of fds or cancel_fd polls readable (or hung up) or deadline_ns (the core's
    clock; None: no deadline) has passed.  Returns the ready fds in the order given, cancel_fd last;
    [] once the deadline has passed, never before it (a deadline already past returns [] at once,
    whatever is ready).  A negative fd is ignored."""
    nat = nat or native.default()
    watched = list(dict.fromkeys(fd for fd in (*fds, cancel_fd) if fd >= 0))
    # poll, not select: select() refuses a descriptor above 1023 (a busy process's).
    p = select.poll()
    for fd in watched:
        p.register(fd, select.POLLIN)
    while True:
        timeout_ms = None
        if deadline_ns is not None:
            left = deadline_ns - nat.now_ns()
            if left <= 0:
                return []
            # Rounded up: rounded down, poll would wake before the deadline and, under 1 ms, spin on
            # a timeout of 0.  poll(2)'s timeout runs on CLOCK_MONOTONIC too; should it still end
            # early (PEP 475 retries after a signal recompute it), the loop waits out the rest.
            timeout_ms = -(-left // _NS_PER_MS)
        events = dict(p.poll(timeout_ms))
        if events:
            return [fd for fd in watched if fd in events]
