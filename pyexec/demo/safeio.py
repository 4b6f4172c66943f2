"""Files root reads or writes in directories another account owns (a database server's data, log and
run directories; a report's directory): reached through directory fds, never through a symlink.

A directory's owner can replace any name in it between two calls, so a path inside it is resolved
once, into an fd opened with O_NOFOLLOW (open(2): ELOOP for a symlink), and every later call is
relative to that fd.  A file root writes there is written under a fresh name (O_EXCL: created, never
opened) and renamed over the old one (rename(2) replaces a symlink or a hard link the owner planted,
it never writes through it).  Only the last component of a path given here is guarded: the
directories above it are the caller's (the demo's sandbox, root's)."""
from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import stat
from collections.abc import Iterator

_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC
# O_NONBLOCK: a FIFO planted where a file is expected would block open(2) for read forever.
_READ = os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC


def open_dir(path: str, dir_fd: int | None = None) -> int:
    """An fd of the directory path (relative to dir_fd if given); OSError (ELOOP, ENOTDIR) if its last
    component is a symlink or not a directory."""
    return os.open(path, _DIR, dir_fd=dir_fd)


@contextlib.contextmanager
def directory(path: str, dir_fd: int | None = None) -> Iterator[int]:
    """open_dir as a context manager: the fd, closed afterwards."""
    fd = open_dir(path, dir_fd)
    try:
        yield fd
    finally:
        os.close(fd)


def read_at(dir_fd: int, name: str) -> bytes:
    """The content of the regular file name in dir_fd; OSError for a symlink (ELOOP), FileNotFoundError,
    or anything but a regular file (EINVAL)."""
    fd = os.open(name, _READ, dir_fd=dir_fd)
    try:
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            raise OSError(22, f"{name} is not a regular file")
        chunks = []
        while chunk := os.read(fd, 1 << 16):
            chunks.append(chunk)
        return b"".join(chunks)
    finally:
        os.close(fd)


def write_at(dir_fd: int, name: str, data: bytes, mode: int = 0o600, uid: int = -1, gid: int = -1) -> None:
    """name in dir_fd replaced by a new file (mode, owner uid/gid) holding data, atomically; whatever
    was there (a symlink, another account's hard link) is replaced, not written through."""
    tmp = f".{name}.{secrets.token_hex(6)}.tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, mode, dir_fd=dir_fd)
    try:
        try:
            os.fchmod(fd, mode)  # not the umask's
            if uid >= 0 or gid >= 0:
                os.fchown(fd, uid, gid)
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        finally:
            os.close(fd)
        os.rename(tmp, name, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp, dir_fd=dir_fd)
        raise


def write_private(path: str, data: bytes) -> None:
    """path replaced by a file of root's, mode 600, holding data (a report: it names paths, LSNs,
    users): never through a symlink or a hard link at path."""
    with directory(os.path.dirname(os.path.abspath(path))) as d:
        write_at(d, os.path.basename(path), data, 0o600)


def own_dir(path: str, uid: int, gid: int, mode: int, dir_fd: int | None = None) -> None:
    """Make the directory path (relative to dir_fd if given; its parents are made by path, as they are
    the caller's) and give it to uid/gid with mode, through its fd: a symlink there is refused."""
    if dir_fd is None:
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with contextlib.suppress(FileExistsError):
        os.mkdir(path, 0o700, dir_fd=dir_fd)
    with directory(path, dir_fd) as fd:
        os.fchown(fd, uid, gid)
        os.fchmod(fd, mode)


def chown_tree(path: str, uid: int, gid: int) -> None:
    """Give path and everything under it to uid/gid, each inode as it was found (os.fwalk walks by fd, so
    a directory swapped for a symlink meanwhile is not entered); symlinks (whose owner gives nothing
    here) and files with other hard links are left as they are."""
    with directory(path) as top:
        os.fchown(top, uid, gid)
    for _, dirs, files, dfd in os.fwalk(path, follow_symlinks=False):
        for n in dirs + files:
            try:
                fd = os.open(n, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dfd)
            except FileNotFoundError:
                continue
            try:
                st = os.fstat(fd)
                # A hard link the tree's owner made to a file elsewhere (root's: one it may write, or any
                # without fs.protected_hardlinks) is that file: chowning it would give it away.
                if stat.S_ISLNK(st.st_mode) or (not stat.S_ISDIR(st.st_mode) and st.st_nlink > 1):
                    continue
                # Through the fd (an O_PATH fd's /proc link names its inode): the name may have been
                # replaced since it was opened.
                os.chown(f"/proc/self/fd/{fd}", uid, gid)
            finally:
                os.close(fd)


def empty_dir(dir_fd: int) -> None:
    """Remove everything in the directory dir_fd (shutil.rmtree by fd: never through a symlink)."""
    for name in os.listdir(dir_fd):
        st = os.lstat(name, dir_fd=dir_fd)
        if stat.S_ISDIR(st.st_mode):
            shutil.rmtree(name, dir_fd=dir_fd)
        else:
            os.unlink(name, dir_fd=dir_fd)
