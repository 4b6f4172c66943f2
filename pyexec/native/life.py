"""This process's life pipe: how a helper learns that its controller died where the kernel has no
pidfd_open (before 5.3)."""
from __future__ import annotations

import os

_life: tuple[int, int, int] | None = None  # (pid, read end, write end)


def life_fd() -> int:
    """The read end of this process's life pipe: the guardian and the warden watch it for the
    hang-up that means this process died, where the kernel has no pidfd_open (before 5.3).  This
    process holds the only write end (close-on-exec, so no script inherits it)."""
    global _life
    if _life is None or _life[0] != os.getpid():  # a forked child needs its own
        r, w = os.pipe2(os.O_CLOEXEC)
        _life = (os.getpid(), r, w)
    return _life[1]
