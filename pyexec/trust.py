"""Ownership and permission checks, done on the open file that will be read or executed.

The path is walked one component at a time with O_PATH|O_NOFOLLOW, so every directory and
every symlink on the way is checked (the OpenSSH StrictModes rule, beyond the reference).
A config is then read through the fd that was checked: no check-then-open race.  A script is
executed by its path (for `$0`), after `recheck` has walked it again and found the same inode; the
snapshot command's program (SNAPSHOT) is walked when resolved and again right before its spawn."""
from __future__ import annotations

import dataclasses
import os
import stat
from typing import Self

from pyexec.config import MAX_CONFIG_BYTES
from pyexec.errors import ConfigError, PyexecError, ScriptError, TrustError


@dataclasses.dataclass(frozen=True)
class Kind:
    """What a file is for, and the codes its problems get."""

    label: str
    not_found: int
    mode_code: int
    owner_code: int
    bad_mode: int  # mode bits that must be clear
    is_script: bool
    borrows_codes: bool = False  # its codes are another kind's: the detail says which file it is


HOST = Kind("plugin host config", 313, 314, 315, 0o033, False)  # group/other: at most read
PLUGIN = Kind("plugin config", 316, 317, 318, 0o177, False)     # 600 or 400: no exec, nothing for g/o
PRE = Kind("pre-script", 302, 306, 306, 0o077 | 0o6000, True)    # nothing for g/o; no setuid/setgid
POST = Kind("post-script", 303, 307, 307, 0o077 | 0o6000, True)
# The snapshot command (`--snapshot-cmd`, resolved on root's PATH): root runs it inside the window,
# so the rules of a script, except that group and others may read and execute it (/usr/bin/cp is
# 755) and setuid is harmless for a program root runs.  Its problems are bad arguments (11).
SNAPSHOT = Kind("snapshot command", 11, 11, 11, 0o022, True)
# The fleet agent's config (pyexec/fleet/agentconfig.py): root's, readable by others at most.
AGENT = Kind("agent config", 320, 321, 321, 0o033, False)
# The agent's etcd client key and password file: root's alone.
AGENT_KEY = Kind("etcd client key or password file (agent config)", 320, 321, 321, 0o077, False, borrows_codes=True)
# A built-in quiescer's password: the pre-phase's codes, as a pre-script of the quiescer's (306-style).
CREDENTIALS = Kind("database credentials file", 302, 306, 306, 0o177, False, borrows_codes=True)
# The CA a quiescer verifies its server's certificate with: anyone may read it, only root may change it.
CA_FILE = Kind("TLS CA file (tlsCAFile)", 302, 306, 306, 0o033, False, borrows_codes=True)
# Where a quiescer's server listens (a failure to reach it is the pre-phase's 300, as a server down).
SOCKET_DIR = Kind("database server socket", 300, 306, 306, 0, False, borrows_codes=True)
# Where the PostgreSQL quiescer writes backup_label in the post-phase: root's alone, itself included.
LABEL_DIR = Kind("backupLabelDirectory", 303, 307, 307, 0o022, False, borrows_codes=True)

MAX_SYMLINKS = 40  # as the kernel's path walk (MAXSYMLINKS)
BINPRM_BUF_SIZE = 256  # how much of a file execve reads for its `#!` line (fs/binfmt_script.c; 128 before Linux 5.1)
MAX_INTERPRETERS = 5  # a `#!` interpreter may itself be one, this deep (fs/exec.c exec_binprm: ELOOP past it)


@dataclasses.dataclass
class TrustedFile:
    """A checked file, open: read it through `fd`; execute it by path only after `recheck`."""

    path: str
    fd: int
    st: os.stat_result
    kind: Kind

    @property
    def executable(self) -> bool:
        """Has an execute bit (root can exec it directly); else it runs through /bin/sh."""
        return bool(self.st.st_mode & 0o111)

    def read(self, limit: int = MAX_CONFIG_BYTES) -> bytes:
        """The content (at most limit+1 bytes, so an oversize file is detected)."""
        chunks, size = [], 0
        while size <= limit:
            chunk = os.pread(self.fd, 65536, size)
            if not chunk:
                break
            chunks.append(chunk)
            size += len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _fail(kind: Kind, code: int, detail: str, path: str) -> PyexecError:
    if kind.borrows_codes:
        detail = f"{kind.label}: {detail}"
    if code == kind.not_found:
        return (ScriptError if kind.is_script else ConfigError)(code, detail, path)
    return TrustError(code, detail, path)


@dataclasses.dataclass(frozen=True)
class Owners:
    """Who may own the directories and symlinks of a path: root, and for a database server's socket its
    own account too (the server creates its socket directory; distributions make it group-writable)."""

    uids: frozenset[int] = frozenset({0})
    gids: frozenset[int] = frozenset()  # a directory writable by one of these groups is accepted
    label: str = "root"


ROOT = Owners()


def _check_dir(kind: Kind, st: os.stat_result, where: str, path: str, owners: Owners = ROOT) -> None:
    if st.st_uid not in owners.uids:
        raise _fail(kind, kind.owner_code, f"directory {where} is owned by uid {st.st_uid}, not {owners.label}", path)
    # A sticky world-writable directory (/tmp) is fine: nobody but root can replace a
    # root-owned file in it, and the file itself must be root's.
    writable = st.st_mode & 0o002 or (st.st_mode & 0o020 and st.st_gid not in owners.gids)
    if writable and not st.st_mode & stat.S_ISVTX:
        raise _fail(kind, kind.mode_code,
                    f"directory {where} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o})", path)


def open_trusted(path: str, kind: Kind) -> TrustedFile:
    """Walk path safely, check every step and the file, and return it open."""
    fd, st, here = _walk(path, kind)
    try:
        return _open_final(kind, fd, st, here, path)
    finally:
        os.close(fd)


def open_dir(path: str, kind: Kind, owners: Owners = ROOT, create_mode: int | None = None) -> int:
    """An O_PATH fd of the directory path names, every step checked as open_trusted's and the directory
    itself too (and not writable by group or others at all if kind.bad_mode says so); missing
    components are created (root's, create_mode) if create_mode is given, each checked as it is."""
    fd, st, here = _walk(path, kind, owners, create_mode, want_dir=True)
    try:
        if not stat.S_ISDIR(st.st_mode):
            raise _fail(kind, kind.not_found, f"{here} is not a directory", path)
        _check_dir(kind, st, here, path, owners)
        if stat.S_IMODE(st.st_mode) & kind.bad_mode:
            raise _fail(kind, kind.mode_code, f"directory {here} is writable by group or others "
                                              f"(mode {stat.S_IMODE(st.st_mode):o})", path)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_socket(path: str, kind: Kind, owners: Owners = ROOT) -> int:
    """An O_PATH fd of the Unix socket path names (connect to /proc/self/fd/<fd>), every directory and
    symlink on the way checked as open_trusted's with owners; the socket's own owner is not checked
    (whoever bound it: the peer's credentials on the connection are what tell the server)."""
    fd, st, here = _walk(path, kind, owners)
    if not stat.S_ISSOCK(st.st_mode):
        os.close(fd)
        raise _fail(kind, kind.not_found, f"{here} is not a socket", path)
    return fd


def _walk(path: str, kind: Kind, owners: Owners = ROOT, create_mode: int | None = None,
          want_dir: bool = False) -> tuple[int, os.stat_result, str]:
    """An O_PATH fd of what path names (symlinks followed if owners own them), with its stat and its
    resolved path; every directory on the way checked."""
    if not isinstance(path, str) or not path.startswith("/"):
        raise _fail(kind, kind.not_found, f"{kind.label} path must be absolute: {path!r}", str(path))
    todo = [p for p in path.split("/") if p]
    dirfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    where = "/"
    hops = 0
    try:
        _check_dir(kind, os.fstat(dirfd), where, path, owners)
        while True:
            if not todo:
                if want_dir:  # the path ended on a directory ("/", "..", a symlink to one)
                    return os.dup(dirfd), os.fstat(dirfd), where
                raise _fail(kind, kind.not_found, f"{kind.label} path names a directory", path)
            name = todo.pop(0)
            if name == ".":
                continue
            try:
                try:
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
                except FileNotFoundError:
                    if create_mode is None:
                        raise
                    # mkdirat never follows a symlink in its last component (mkdir(2): EEXIST).
                    os.mkdir(name, create_mode, dir_fd=dirfd)
                    fd = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=dirfd)
            except FileNotFoundError as err:
                raise _fail(kind, kind.not_found, f"{kind.label} not found ({os.path.join(where, name)} "
                            "does not exist)", path) from err
            except NotADirectoryError as err:
                raise _fail(kind, kind.not_found, f"{where} is not a directory", path) from err
            except OSError as err:
                raise _fail(kind, kind.not_found, f"cannot open {os.path.join(where, name)}: {err.strerror}",
                            path) from err
            st = os.fstat(fd)
            here = os.path.join(where, name)
            if stat.S_ISLNK(st.st_mode):
                try:
                    # A symlink's own mode is always 777; what matters is who can replace it.
                    if st.st_uid not in owners.uids:
                        raise _fail(kind, kind.owner_code,
                                    f"symlink {here} is owned by uid {st.st_uid}, not {owners.label}", path)
                    hops += 1
                    if hops > MAX_SYMLINKS:
                        raise _fail(kind, kind.not_found, f"too many symlinks resolving {path}", path)
                    target = os.readlink(name, dir_fd=dirfd)
                finally:
                    os.close(fd)
                todo = [p for p in target.split("/") if p] + todo
                if target.startswith("/"):
                    os.close(dirfd)
                    dirfd = os.open("/", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
                    where = "/"
                continue
            if todo:
                if not stat.S_ISDIR(st.st_mode):
                    os.close(fd)
                    raise _fail(kind, kind.not_found, f"{here} is not a directory", path)
                try:
                    if name != "..":
                        _check_dir(kind, st, here, path, owners)
                except PyexecError:
                    os.close(fd)
                    raise
                os.close(dirfd)
                dirfd, where = fd, os.path.normpath(here)
                continue
            return fd, st, here
    finally:
        os.close(dirfd)


def _open_final(kind: Kind, pfd: int, st: os.stat_result, here: str, path: str, depth: int = 0) -> TrustedFile:
    if not stat.S_ISREG(st.st_mode):
        what = "a directory" if stat.S_ISDIR(st.st_mode) else "not a regular file"
        if kind.is_script or kind.borrows_codes:
            raise _fail(kind, kind.not_found if kind.is_script else kind.mode_code, f"{here} is {what}", path)
        raise ConfigError(304 if kind is HOST else 305, f"{here} is {what}", path)
    if st.st_uid != 0:
        raise _fail(kind, kind.owner_code, f"{here} is owned by uid {st.st_uid}, not root", path)
    mode = stat.S_IMODE(st.st_mode)
    if mode & kind.bad_mode:
        detail = f"{here} has mode {mode:o}"
        if kind.is_script and mode & 0o6000:
            detail += " (setuid/setgid scripts are refused)"
        raise _fail(kind, kind.mode_code, detail, path)
    if not kind.is_script and st.st_size > MAX_CONFIG_BYTES:
        raise ConfigError(304 if kind is HOST else 305, f"{here} is larger than {MAX_CONFIG_BYTES} bytes", path)
    # Reopening the O_PATH fd through /proc gives the very inode that was checked.
    fd = os.open(f"/proc/self/fd/{pfd}", os.O_RDONLY | os.O_CLOEXEC | os.O_NOCTTY)
    st2 = os.fstat(fd)
    if (st2.st_dev, st2.st_ino) != (st.st_dev, st.st_ino):  # cannot happen; refuse if it does
        os.close(fd)
        raise _fail(kind, kind.mode_code, f"{here} changed while it was being opened", path)
    if kind.is_script and st2.st_mode & 0o111:
        try:
            _check_interpreter(kind, fd, here, path, depth)
        except BaseException:
            os.close(fd)
            raise
    return TrustedFile(path, fd, st2, kind)


def _check_interpreter(kind: Kind, fd: int, here: str, path: str, depth: int) -> None:
    """The program execve runs for an executable `#!` file is its interpreter, as root: walked with the
    file's rules, except that anyone may read and execute it (/bin/sh is 755).  One that does not
    exist is the exec's to report (ENOENT): the walk that found it missing showed only root could
    make it.  A file without the execute bit runs as `sh PATH`, its `#!` line a comment."""
    head = os.pread(fd, BINPRM_BUF_SIZE, 0)
    if not head.startswith(b"#!"):
        return
    if depth >= MAX_INTERPRETERS:  # execve would fail (ELOOP); unchecked, it must not run
        raise _fail(kind, kind.mode_code, f"{here}: more than {MAX_INTERPRETERS} #! interpreters", path)
    # binfmt_script: the name is the first run of characters other than space, tab and NUL after `#!`.
    name = head[2:].split(b"\n", 1)[0].lstrip(b" \t").split(b"\0", 1)[0].replace(b"\t", b" ").split(b" ", 1)[0]
    if not name:
        return
    # A relative name is looked up from the cwd, which is `/` for everything pyexec runs.
    interp = os.path.join("/", os.fsdecode(name))
    ikind = dataclasses.replace(kind, bad_mode=0o022)
    try:
        ifd, ist, ihere = _walk(interp, ikind)
        try:
            _open_final(ikind, ifd, ist, ihere, interp, depth + 1).close()
        finally:
            os.close(ifd)
    except PyexecError as e:
        if isinstance(e.__cause__, FileNotFoundError):  # a component missing, in directories only root changes
            return
        raise _fail(kind, e.code, f"{here}'s interpreter {interp} (its #! line): {e.detail}", path) from e


def recheck(f: TrustedFile) -> None:
    """Walk f.path again with every check and raise unless it still names f's inode.

    Scripts are executed by path (so that `$0` is the configured path), not through f.fd:
    called right before the spawn, this bounds the time in which the path could name another
    file to the spawn itself, and the walk proves that at this moment every component of the
    path is root's and not writable by others, so only root could change it in that time."""
    with open_trusted(f.path, f.kind) as now:
        if (now.st.st_dev, now.st.st_ino) != (f.st.st_dev, f.st.st_ino):
            raise _fail(f.kind, f.kind.mode_code, f"{f.path} was replaced after it was checked", f.path)
