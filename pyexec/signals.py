"""SIGINT, SIGTERM, SIGHUP (and every other signal that would end pyexec) during a run: recorded,
not raised, and turned into a cancel fd.

A signal must not unwind the run at an arbitrary instant (a quiesced application would stay
quiesced), and it must wake the native waits at once.  Inside `Cancel()` each of SIGNALS gets a
handler that does nothing (outside `raising()`, the caller's own code), and Python's wake-up fd
writes the signal's number into a pipe whose read end every native wait polls (`cancel_fd`): a running script or snapshot command is killed,
the window thaws, the post-scripts run, and the caller exits 128 + signal."""
from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Callable, Iterator
from types import FrameType
from typing import Any, Self

# What signal.signal returns: the previous handler.
Handler = Callable[[int, FrameType | None], Any] | int | signal.Handlers | None

# Every signal whose default action would end pyexec (SIGKILL and SIGSTOP cannot be caught; SIGPIPE
# Python ignores already).
SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP, signal.SIGQUIT, signal.SIGUSR1, signal.SIGUSR2,
           signal.SIGALRM, signal.SIGVTALRM, signal.SIGPROF, signal.SIGXCPU)


CANCELLED = 0  # the byte trigger() writes: no signal has number 0


class Interrupted(Exception):
    """Raised into a caller's code (a snapshot callable) when a signal cancels the run."""

    def __init__(self, signum: int):
        self.signum = signum
        self.name = "cancelled" if signum == CANCELLED else signal.Signals(signum).name
        super().__init__(f"interrupted by {self.name}")


class Cancel:
    """A scope in which SIGNALS (or the set given) cancel the run instead of interrupting it.

    Outside the main thread (where Python cannot install handlers) it is inert (fd is -1), unless
    handle_signals is False: then it is a pipe that only trigger() cancels, in any thread.  unblock:
    those of the set to unblock (default: all), for a set with a signal the caller's mask keeps."""

    def __init__(self, handle_signals: bool = True, signals: tuple[int, ...] = SIGNALS,
                 unblock: tuple[int, ...] | None = None):
        self.fd = -1
        self.signum: int | None = None
        self.signals = signals
        self._unblock = signals if unblock is None else unblock
        self._handle = handle_signals
        self._w = -1
        self._old: dict[signal.Signals, Handler] = {}
        self._old_wakeup = -1
        self._raising = 0

    def _handler(self, signum: int, _frame: FrameType | None) -> None:
        # The wake-up fd has the signal.  Only inside raising() (the caller's own code, which no
        # fd can wake) does it unwind anything.
        if self._raising:
            self._raising = 0
            raise Interrupted(signum)

    @contextlib.contextmanager
    def raising(self) -> Iterator[None]:
        """Inside the block a signal raises Interrupted (at once if one came already)."""
        first = self.first()
        if first is not None:
            raise Interrupted(first)
        self._raising = 1
        try:
            yield
        finally:
            self._raising = 0

    @contextlib.contextmanager
    def not_raising(self) -> Iterator[None]:
        """Inside the block (within raising()'s) a signal raises nothing: code that polls `fd` itself
        and must not be unwound half way (a group run's host deciding when it may thaw)."""
        outer = self._raising
        self._raising = 0
        try:
            yield
        finally:
            self._raising = outer

    def __enter__(self) -> Self:
        if not self._handle:  # a pipe only: cancelled by trigger() (asyncio cancellation)
            self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
            return self
        if threading.current_thread() is not threading.main_thread():
            return self
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = {signal.Signals(s): signal.signal(s, self._handler) for s in self.signals}
        # A caller that blocked them (to sigwait) would otherwise never let them reach us.
        self._old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, self._unblock)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc: object) -> None:
        if self.fd < 0:
            return
        if self._handle:
            signal.set_wakeup_fd(self._old_wakeup)
            for s, h in self._old.items():
                signal.signal(s, h)
            signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        os.close(self.fd)
        os.close(self._w)
        self.fd = self._w = -1

    def first(self) -> int | None:
        """The first of the signals to arrive (CANCELLED for trigger()), or None: read from the pipe
        (ordered by arrival, unlike the handlers, which Python runs by signal number), without
        draining it: every later wait must still wake."""
        if self.signum is not None or self.fd < 0:
            return self.signum
        try:
            data = os.read(self.fd, 65536)
        except BlockingIOError:
            return None
        os.write(self._w, data)
        self.signum = next((b for b in data if b in self.signals or b == CANCELLED), None)
        return self.signum

    def trigger(self) -> None:
        """Cancel the run from another thread (asyncio cancellation), as a signal would."""
        if self._w >= 0:
            os.write(self._w, bytes([CANCELLED]))

    @property
    def cancelled(self) -> bool:
        """Whether one of the signals has arrived, or trigger() was called."""
        return self.first() is not None

    @property
    def name(self) -> str | None:
        """The first signal's name (SIGINT, …, or "cancelled" for trigger()), once it has arrived."""
        first = self.first()
        if first is None:
            return None
        return "cancelled" if first == CANCELLED else signal.Signals(first).name
