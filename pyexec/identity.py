"""A mount point opened without following a symlink, and the identity (mount id, device, inode) that
says an fd is still the root of the mount mountinfo named.

A path is only a name: a user who owns a directory above a mount point can rename it and put a
symlink in its place between the plan and the freeze.  So each mount point is opened once, no
symlink followed on the way, checked against mountinfo by mount id, and from then on frozen,
thawed and re-checked through that fd, never through its path again."""
from __future__ import annotations

import ctypes
import dataclasses
import errno
import os
import stat
import struct

from pyexec import errors, kernel, mounts

_NR_OPENAT2 = 437  # one number on every architecture (the unified table of 5.6, openat2(2))
_RESOLVE_NO_MAGICLINKS, _RESOLVE_NO_SYMLINKS = 0x02, 0x04  # linux/openat2.h
_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC
_libc: ctypes.CDLL | None = None


@dataclasses.dataclass(frozen=True)
class Identity:
    """What an open mount point is: its mount (mnt_id, as mountinfo's first field), its device and inode."""

    mnt_id: int
    st_dev: int
    st_ino: int


def _openat2_open(path: str) -> int:
    """openat2(2) with RESOLVE_NO_SYMLINKS (5.6; pyexec.kernel says whether this kernel has it)."""
    global _libc
    if _libc is None:
        _libc = ctypes.CDLL(None, use_errno=True)
    how = struct.pack("=QQQ", _FLAGS, 0, _RESOLVE_NO_SYMLINKS | _RESOLVE_NO_MAGICLINKS)
    fd = _libc.syscall(ctypes.c_long(_NR_OPENAT2), ctypes.c_int(-100), os.fsencode(path),  # AT_FDCWD
                       ctypes.c_char_p(how), ctypes.c_size_t(len(how)))
    if fd < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e), path)
    return int(fd)


def _walk_open(path: str) -> int:
    """The same open without openat2: from `/`, one component at a time, each O_NOFOLLOW
    (a symlink answers ELOOP or ENOTDIR, never followed)."""
    fd = os.open("/", _FLAGS | os.O_NOFOLLOW)
    try:
        for part in path.split("/"):
            if part in ("", "."):
                continue
            try:
                nxt = os.open(part, _FLAGS | os.O_NOFOLLOW, dir_fd=fd)
            except NotADirectoryError:  # O_DIRECTORY answers first for a symlink: say what it was
                if stat.S_ISLNK(os.stat(part, dir_fd=fd, follow_symlinks=False).st_mode):
                    raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), path) from None
                raise
            os.close(fd)
            fd = nxt
        return fd
    except BaseException:
        os.close(fd)
        raise


def open_dir(path: str) -> int:
    """A directory fd on the absolute path, no symlink followed anywhere on the way; FreezeError 123
    (naming the symlink refusal when that is why) if it cannot be opened so."""
    if not os.path.isabs(path) or ".." in path.split("/"):
        raise errors.FreezeError(123, "a mount point must be an absolute path without '..'", path,
                                 errno=errno.EINVAL)
    try:
        return _openat2_open(path) if kernel.features()["openat2"] else _walk_open(path)
    except OSError as err:
        e = err.errno or 0
        why = ("a symlink on the way to the mount point: refused, never followed" if e == errno.ELOOP
               else f"cannot open mount point: {err.strerror}")
        raise errors.FreezeError(123, why, path, errno=e) from err


def mnt_id(fd: int) -> int:
    """The mount an fd is on (/proc/self/fdinfo's mnt_id, 3.15; mountinfo's first field)."""
    with open(f"/proc/self/fdinfo/{fd}", "rb") as f:
        for line in f:
            if line.startswith(b"mnt_id:"):
                return int(line.split()[1])
    raise OSError(errno.ENOTSUP, "no mnt_id in fdinfo (before 3.15)")


def of_fd(fd: int) -> Identity:
    """The identity of an open directory."""
    st = os.fstat(fd)
    return Identity(mnt_id(fd), st.st_dev, st.st_ino)


def _is_mount_root(fd: int, mid: int) -> bool:
    """Whether fd is the root of its mount: its `..` (which the kernel takes across a mount) is on another one."""
    up = os.open("..", _FLAGS | os.O_NOFOLLOW, dir_fd=fd)
    try:
        return mnt_id(up) != mid
    finally:
        os.close(up)


def _dev(m: mounts.Mount) -> int:
    major, minor = m.dev.split(":")
    return os.makedev(int(major), int(minor))


def open_mount(m: mounts.Mount) -> tuple[int, Identity]:
    """An fd on the root of the mount m (as planned from mountinfo), and its identity; FreezeError 123
    if what is at m's mount point now is another mount (a swapped path): refused, never followed."""
    fd = open_dir(m.mount_point)
    try:
        ident = of_fd(fd)
        why = None
        if ident.mnt_id != m.mnt_id or (m.mount_point != "/" and not _is_mount_root(fd, m.mnt_id)):
            why = f"is no longer the root of mount {m.mnt_id} ({m.dev}) that mountinfo named"
        # A btrfs subvolume has an st_dev of its own, not mountinfo's (the superblock's): the mount id
        # alone says which filesystem it is.  Every other freezable filesystem has the block device's.
        elif m.fstype != "btrfs" and ident.st_dev != _dev(m):
            why = f"has device {os.major(ident.st_dev)}:{os.minor(ident.st_dev)}, mountinfo said {m.dev}"
        if why:
            raise errors.FreezeError(123, f"the mount point {why}: a path swapped under it is refused, "
                                     "never followed", m.mount_point)
        return fd, ident
    except BaseException:
        os.close(fd)
        raise


def by_mnt_id(text: str) -> dict[int, mounts.Mount]:
    """Every mount of a mountinfo text by its mount id."""
    return {m.mnt_id: m for m in mounts.parse_mountinfo(text)}


def recheck(m: mounts.Mount, text: str) -> None:
    """FreezeError 123 unless mount m is still mounted, at its planned mount point, and the one seen
    there (nothing mounted over it, no directory above it renamed): just before the freeze."""
    now = by_mnt_id(text).get(m.mnt_id)
    if now is None or now.dev != m.dev:
        why = "was unmounted since it was planned"
    elif now.mount_point != m.mount_point:
        why = f"moved to {now.mount_point} since it was planned (a directory above it was renamed)"
    elif mounts.visible(mounts.parse_mountinfo(text)).get(m.mount_point) != now:
        why = "is hidden by a mount over it since it was planned"
    else:
        return
    raise errors.FreezeError(123, f"mount {m.mnt_id} ({m.dev}) {why}: refused before any freeze", m.mount_point)


def superblock(fd: int, text: str) -> str | None:
    """The superblock (mountinfo's major:minor) the open fd is on, by its mount id; None if unknown."""
    m = by_mnt_id(text).get(mnt_id(fd))
    return m.dev if m else None


def matches(path: str, recorded: Identity) -> int | None:
    """An fd on path if it is still the mount recorded (same mount id, device and inode), else None."""
    try:
        fd = open_dir(path)
    except errors.FreezeError:
        return None
    try:
        if of_fd(fd) == recorded:
            return fd
    except OSError:
        pass
    os.close(fd)
    return None
