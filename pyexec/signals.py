"""SIGINT, SIGTERM and SIGHUP during a run: recorded, never raised, and turned into a cancel fd.

A signal must not unwind the run at an arbitrary instant (a quiesced application would stay
quiesced), and it must wake the native waits at once.  Inside `Cancel()` the three signals get a
handler that only records the first one, and Python's wake-up fd writes a byte into a pipe whose
read end every native wait polls (`cancel_fd`): a running script or snapshot command is killed,
the window thaws, the post-scripts run, and the caller exits 128 + signal."""
from __future__ import annotations

import os
import select
import signal
import threading

SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Cancel:
    """A scope in which SIGINT/SIGTERM/SIGHUP cancel the run instead of interrupting it.

    Outside the main thread (where Python cannot install handlers) it is inert: fd is -1."""

    def __init__(self):
        self.fd = -1
        self.signum: int | None = None
        self._w = -1
        self._old: dict = {}
        self._old_wakeup = -1

    def _handler(self, signum, _frame) -> None:
        if self.signum is None:
            self.signum = signum

    def __enter__(self) -> "Cancel":
        if threading.current_thread() is not threading.main_thread():
            return self
        self.fd, self._w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
        self._old = {s: signal.signal(s, self._handler) for s in SIGNALS}
        # A caller that blocked them (to sigwait) would otherwise never let them reach us.
        self._old_mask = signal.pthread_sigmask(signal.SIG_UNBLOCK, SIGNALS)
        self._old_wakeup = signal.set_wakeup_fd(self._w, warn_on_full_buffer=False)
        return self

    def __exit__(self, *exc) -> None:
        if self.fd < 0:
            return
        signal.set_wakeup_fd(self._old_wakeup)
        for s, h in self._old.items():
            signal.signal(s, h)
        signal.pthread_sigmask(signal.SIG_SETMASK, self._old_mask)
        os.close(self.fd)
        os.close(self._w)
        self.fd = self._w = -1

    @property
    def cancelled(self) -> bool:
        """Whether one of the signals has arrived (its byte is in the pipe, or its handler ran)."""
        if self.signum is not None:
            return True
        if self.fd < 0:
            return False
        p = select.poll()
        p.register(self.fd, select.POLLIN)
        return bool(p.poll(0))

    @property
    def name(self) -> str | None:
        """The first signal's name (SIGINT, …), once it has arrived."""
        if self.signum is None and self.cancelled:
            # The byte is there but the handler has not run yet: it runs at the next bytecode of
            # the main thread; read the number from the pipe without waiting for it.
            try:
                data = os.read(self.fd, 1)
                os.write(self._w, data)  # keep the pipe readable: every later wait must wake too
                self.signum = data[0]
            except OSError:
                return None
        return signal.Signals(self.signum).name if self.signum is not None else None
