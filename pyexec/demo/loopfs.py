"""Loop-mounted filesystem images: the sandbox the demo and the tests freeze.

Only filesystems made here are ever frozen by the demo and the tests.  `LoopFS.close`
thaws (best effort), unmounts and detaches whatever happens."""
from __future__ import annotations

import contextlib
import os
import subprocess
from typing import Self

# Smallest sizes the mkfs tools accept, with room for a test's data.
MIN_SIZE_MB = {"ext4": 64, "ext3": 64, "xfs": 320, "btrfs": 128}
MKFS = {
    "ext4": ["mkfs.ext4", "-q", "-F"],
    "ext3": ["mkfs.ext3", "-q", "-F"],
    "xfs": ["mkfs.xfs", "-q", "-f"],
    "btrfs": ["mkfs.btrfs", "-q", "-f"],
}


def thaw_path(path: str) -> bool:
    """Thaw path with util-linux fsfreeze if it is frozen; True if it was.  The sandbox's own
    watchdog (tests, demo): a tool independent of pyexec's thaw, so it also checks pyexec's work."""
    res = subprocess.run(["fsfreeze", "--unfreeze", path], capture_output=True, timeout=30)
    return res.returncode == 0


class LoopFSError(RuntimeError):
    """A loop image could not be made, attached or mounted."""


def _run(argv: list[str]) -> str:
    try:
        res = subprocess.run(argv, capture_output=True, text=True, timeout=120, check=False)
    except FileNotFoundError as err:
        raise LoopFSError(f"{argv[0]} is not installed") from err
    except subprocess.TimeoutExpired as err:  # a hung umount: close() goes on to umount -l and the detach
        raise LoopFSError(f"{' '.join(argv)} did not end within {err.timeout:g}s") from err
    if res.returncode != 0:
        raise LoopFSError(f"{' '.join(argv)} failed: {res.stderr.strip() or res.stdout.strip()}")
    return res.stdout


class LoopFS:
    """An image file holding one filesystem, loop-attached and mounted."""

    def __init__(self, image: str, mountpoint: str, fstype: str, size_mb: int | None = None,
                 create: bool = True, options: str | None = None):
        """options: mount options (a restored xfs copy next to its original needs "nouuid")."""
        self.image = image
        self.mountpoint = mountpoint
        self.fstype = fstype
        self.device: str | None = None
        self.mounted = False
        size_mb = max(size_mb or 0, MIN_SIZE_MB.get(fstype, 64))
        try:
            if create:
                with open(image, "wb") as f:
                    f.truncate(size_mb << 20)
                _run(MKFS[fstype] + [image])
            os.makedirs(mountpoint, exist_ok=True)
            self.device = _run(["losetup", "--find", "--show", image]).strip()
            _run(["mount", "-t", fstype, *(["-o", options] if options else []), self.device, mountpoint])
            self.mounted = True
        except BaseException:
            self.close()
            raise

    def thaw(self) -> bool:
        """Thaw the mount if it is frozen (a no-op otherwise)."""
        return self.mounted and thaw_path(self.mountpoint)

    def close(self, remove_image: bool = True) -> None:
        """Thaw, unmount, detach and (by default) delete the image, whatever state it is in."""
        if self.mounted:
            with contextlib.suppress(subprocess.TimeoutExpired):  # a hung fsfreeze must not keep it attached
                self.thaw()
            with contextlib.suppress(LoopFSError):
                _run(["umount", self.mountpoint])
                self.mounted = False
            if self.mounted:
                with contextlib.suppress(LoopFSError):
                    _run(["umount", "-l", self.mountpoint])
                self.mounted = False
        if self.device:
            with contextlib.suppress(LoopFSError):
                _run(["losetup", "-d", self.device])
            self.device = None
        if remove_image:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.image)
        with contextlib.suppress(OSError):
            os.rmdir(self.mountpoint)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
