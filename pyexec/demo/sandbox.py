"""The demos' sandbox: a new directory holding an outer btrfs loop image (the storage layer) and the
disk images made inside it, loop-mounted; an image cloned by reflink inside a freeze window."""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile

from pyexec.demo import loopfs
from pyexec.demo.output import say

FICLONE = 0x40049409  # _IOW(0x94, 9, int), linux/fs.h


def reflink(src: str, dst: str) -> None:
    """A copy-on-write clone of src at dst (both on the outer btrfs)."""
    s = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
    try:
        d = os.open(dst, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
        try:
            fcntl.ioctl(d, FICLONE, s)
        finally:
            os.close(d)
    finally:
        os.close(s)


class LoopSandbox:
    """A new directory (prefix, under base or the temporary directory) and the loop mounts made in
    it, in order; `remove` unmounts them in reverse and removes the directory."""

    def __init__(self, prefix: str, base: str | None):
        self.dir = tempfile.mkdtemp(prefix=prefix, dir=base)
        self.fs: list[loopfs.LoopFS] = []

    def build_outer(self) -> None:
        """The outer btrfs image, mounted at outer/: the disk images go inside it."""
        say(f"sandbox in {self.dir}: outer btrfs image (the storage layer)")
        self.outer = self._mount("outer.img", "outer", "btrfs", 1024)

    def _mount(self, image: str, mnt: str, fstype: str, size_mb: int) -> loopfs.LoopFS:
        m = loopfs.LoopFS(os.path.join(self.dir, image), os.path.join(self.dir, mnt), fstype, size_mb)
        self.fs.append(m)
        return m

    def thaw(self) -> None:
        """Thaw every mount (a frozen disk would hang its unmount and whatever writes to it)."""
        for m in self.fs:
            m.thaw()

    def remove(self) -> None:
        """Unmount and detach every disk, last made first, and remove the directory."""
        for m in reversed(self.fs):
            m.close()
        shutil.rmtree(self.dir, ignore_errors=True)
