"""/proc/self/mountinfo → which filesystems to freeze, once each, in a safe order.

Reads text only; never issues an ioctl.  Order: a filesystem is frozen before any
filesystem it lives on (a loop image's backing file, the mount under its mount point),
so that nothing it needs for writeback is frozen first; `/` last."""
from __future__ import annotations

import contextlib
import dataclasses
import errno
import os
import stat
from collections.abc import Callable, Collection, Iterable, Sequence

from pyexec import errors
from pyexec.native._api import PX_MAX_MOUNTS

FREEZABLE = ("ext3", "ext4", "xfs", "btrfs")
# Filesystems FIFREEZE refuses (no block device, or no freeze support): refused before any script.
NOT_FREEZABLE = {"tmpfs", "ramfs", "proc", "sysfs", "devtmpfs", "devpts", "cgroup", "cgroup2", "overlay",
                 "squashfs", "nfs", "nfs4", "cifs", "smb3", "autofs", "debugfs", "tracefs", "securityfs", "pstore",
                 "bpf", "mqueue", "hugetlbfs", "configfs", "binfmt_misc", "efivarfs", "nsfs", "rpc_pipefs"}
# Where a block device's data lives: loop_backing_file, or a test's stand-in (a path, paths or None).
Backing = Callable[[str], str | Sequence[str] | None]
MAX_MOUNTS = PX_MAX_MOUNTS  # the most one freeze set holds


@dataclasses.dataclass(frozen=True)
class Mount:
    """One mounted filesystem (one superblock) to freeze."""

    mount_point: str
    fstype: str
    dev: str  # major:minor of the superblock
    source: str
    root: str  # the mount's root within its filesystem ("/" unless a bind or subvolume)
    # mountinfo's first field: which mount (identity.py checks an open fd against it); not part of
    # equality, so that a mount compares by what it is, not by when it was mounted.
    mnt_id: int = dataclasses.field(default=0, compare=False)


def _unescape(field: str) -> str:
    # mountinfo escapes space, tab, newline and backslash as \ooo octal.
    out, i = [], 0
    while i < len(field):
        if field[i] == "\\" and i + 4 <= len(field) and field[i + 1:i + 4].isdigit():
            out.append(chr(int(field[i + 1:i + 4], 8)))
            i += 4
        else:
            out.append(field[i])
            i += 1
    return "".join(out)


def parse_mountinfo(text: str) -> list[Mount]:
    """Every mount of a mountinfo text, in order, of any type."""
    mounts = []
    for line in text.splitlines():
        if " - " not in line:
            continue
        left, right = line.split(" - ", 1)
        lf, rf = left.split(), right.split()
        if len(lf) < 5 or len(rf) < 2:
            continue
        mounts.append(Mount(_unescape(lf[4]), rf[0], lf[2], _unescape(rf[1]), _unescape(lf[3]),
                            int(lf[0]) if lf[0].isdigit() else 0))
    return mounts


def loop_backing_file(source: str, _depth: int = 0) -> list[str]:
    """The files a block device's data lives in, from sysfs: a loop device's backing file, through
    any stack of devices (a loop on a loop, device-mapper/LVM or md over loops); [] for a disk."""
    if _depth > 16 or not source.startswith("/dev/"):
        return []
    name = os.path.basename(os.path.realpath(source))
    out: list[str] = []
    try:
        with open(f"/sys/class/block/{name}/loop/backing_file") as f:
            backing = f.read().strip()
    except OSError:
        backing = ""
    if backing:  # a loop device whose backing is itself a device is one more layer down
        return loop_backing_file(backing, _depth + 1) if backing.startswith("/dev/") else [backing]
    with contextlib.suppress(OSError):
        for lower in sorted(os.listdir(f"/sys/class/block/{name}/slaves")):
            out += loop_backing_file(f"/dev/{lower}", _depth + 1)
    return out


def _backing_list(backing: Backing, source: str) -> list[str]:
    found = backing(source)
    if not found:
        return []
    return [found] if isinstance(found, str) else list(found)


def _contains(mount_point: str, path: str) -> bool:
    return mount_point == "/" or path == mount_point or path.startswith(mount_point.rstrip("/") + "/")


def visible(mounts: list[Mount]) -> dict[str, Mount]:
    """The mount seen at each mount point: the last one mounted over a path hides earlier ones."""
    return {m.mount_point: m for m in mounts}


def _host_of(mounts: Iterable[Mount], path: str) -> Mount | None:
    """The mount path lives on: the deepest one containing it."""
    return max((m for m in mounts if _contains(m.mount_point, path)), key=lambda m: len(m.mount_point), default=None)


def read_mountinfo() -> str:
    """This process's /proc/self/mountinfo, to read once for several questions."""
    with open("/proc/self/mountinfo") as f:
        return f.read()


def _mountinfo(text: str | None) -> list[Mount]:
    return parse_mountinfo(read_mountinfo() if text is None else text)


def select(mounts: list[Mount], skip: Iterable[str] = (), fstypes: Collection[str] = FREEZABLE,
           backing: Backing = loop_backing_file) -> list[Mount]:
    """The freezable mounts, one per superblock, minus `skip`, in freeze order."""
    seen = visible(mounts)
    skipped = {os.path.normpath(s) for s in skip}
    # A freeze is per superblock: skipping one of its mounts (a bind, a subvolume) skips them all.
    skip_devs = {m.dev for m in seen.values() if m.mount_point in skipped}
    per_dev: dict[str, Mount] = {}
    for m in seen.values():
        if m.fstype not in fstypes or m.dev in skip_devs:
            continue
        cur = per_dev.get(m.dev)
        # Of a superblock's mounts (binds, subvolumes) freeze through the plainest one.
        if cur is None or (m.root == "/", -len(m.mount_point)) > (cur.root == "/", -len(cur.mount_point)):
            per_dev[m.dev] = m
    chosen = list(per_dev.values())
    return order(chosen, visible=list(seen.values()), backing=backing)


def order(chosen: list[Mount], visible: list[Mount] | None = None,
          backing: Backing = loop_backing_file) -> list[Mount]:
    """chosen in freeze order: each before what it lives on, deepest first, `/` last."""
    visible = visible or chosen

    by_dev = {m.dev: m for m in chosen}
    lives_on: dict[str, set[str]] = {m.dev: set() for m in chosen}
    for m in chosen:
        places = [os.path.dirname(m.mount_point.rstrip("/")) or "/"] if m.mount_point != "/" else []
        places += _backing_list(backing, m.source)
        for place in places:
            host = _host_of(visible, place)
            if host is not None and host.dev in by_dev and host.dev != m.dev:
                lives_on[m.dev].add(host.dev)
    # Kahn's algorithm: a mount is ready once nothing still unfrozen lives on it.
    needed_by = {d: {o for o in lives_on if d in lives_on[o]} for d in lives_on}
    rank = sorted(chosen, key=lambda m: (m.mount_point == "/", -m.mount_point.count("/"), m.mount_point))
    done: list[Mount] = []
    left = list(rank)
    while left:
        ready = [m for m in left if not (needed_by[m.dev] - {d.dev for d in done})]
        if not ready:
            # Each of these lives on another of them: whichever goes first, a FIFREEZE would wait
            # for a filesystem already frozen.  No order is safe.
            raise errors.FreezeError(123, "no safe freeze order: these filesystems live on each other: "
                                     + ", ".join(m.mount_point for m in left))
        done.append(ready[0])
        left.remove(ready[0])
    return done


def _foreign_symlink(path: str) -> str | None:
    """The first symlink on the way to path that another user than root owns (and so can point
    elsewhere at any moment), or None.  Root's symlinks are followed as the kernel would."""
    parts = [p for p in os.path.abspath(path).split("/") if p]
    cur, hops = "/", 0
    while parts:
        name = parts.pop(0)
        here = os.path.join(cur, name)
        try:
            st = os.lstat(here)
        except OSError:
            return None  # plan says what is missing
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if st.st_uid != 0:
                return f"{here} (owned by uid {st.st_uid})"
            if hops > 40:  # MAXSYMLINKS: realpath's answer decides
                return None
            target = os.readlink(here)
            parts = [p for p in target.split("/") if p] + parts
            cur = "/" if target.startswith("/") else cur
            continue
        cur = os.path.normpath(here)  # cur has no symlink: its ".." is the lexical one
    return None


def plan(paths: Iterable[str], text: str | None = None, backing: Backing = loop_backing_file) -> list[Mount]:
    """The filesystems under paths (mount points or any path on one), once per superblock, in
    freeze order; FreezeError 123 for a path that is not there, one named through a symlink another
    user than root owns, or an order that cannot be safe.

    The one place every explicit list is ordered (the CLI, the library, safefreeze,
    pluginhost), with the same rule as discovery."""
    seen = visible(_mountinfo(text))
    per_dev: dict[str, Mount] = {}
    for p in paths:
        foreign = _foreign_symlink(p)
        if foreign is not None:
            raise errors.FreezeError(123, f"named through the symlink {foreign}: a mount point is never "
                                     "named through a symlink another user can change", p, errno=errno.ELOOP)
        real = os.path.realpath(p)
        if not os.path.isdir(real):
            there = os.path.exists(real)
            raise errors.FreezeError(123, "not a directory" if there else "no such directory", p,
                                     errno=errno.ENOTDIR if there else errno.ENOENT)
        host = _host_of(seen.values(), real)
        if host is None:
            raise errors.FreezeError(123, "on no mounted filesystem", p)
        if host.fstype in NOT_FREEZABLE or host.fstype.startswith("fuse"):
            raise errors.FreezeNotSupported(121, f"a {host.fstype} filesystem cannot be frozen: "
                                            f"{os.strerror(errno.EOPNOTSUPP)} (mounted at {host.mount_point})", p,
                                            errno=errno.EOPNOTSUPP)
        # One FIFREEZE per superblock (mountinfo's major:minor is the superblock's: a btrfs
        # subvolume has an st_dev of its own, but not a superblock): the first path named wins.
        per_dev.setdefault(host.dev, host)
    if len(per_dev) > MAX_MOUNTS:
        raise errors.FreezeError(121, f"{len(per_dev)} filesystems: at most {MAX_MOUNTS} per window")
    return order(list(per_dev.values()), visible=list(seen.values()), backing=backing)


def underneath(chosen: list[Mount], text: str | None = None,
               backing: Backing = loop_backing_file) -> list[Mount]:
    """The filesystems the chosen ones' devices live in, transitively (a loop image's filesystem,
    through any stack of devices), not counting the chosen themselves: a thaw of a chosen one may
    write to them."""
    seen = visible(_mountinfo(text)).values()
    chosen_devs = {m.dev for m in chosen}
    found: dict[str, Mount] = {}
    todo = list(chosen)
    while todo:
        m = todo.pop()
        for place in _backing_list(backing, m.source):
            h = _host_of(seen, place)
            if h is not None and h.dev not in chosen_devs and h.dev not in found:
                found[h.dev] = h
                todo.append(h)
    return list(found.values())


def discover(skip: Iterable[str] = (), path: str = "/proc/self/mountinfo") -> list[Mount]:
    """The freezable filesystems of this machine, in freeze order (read-only)."""
    with open(path) as f:
        return select(parse_mountinfo(f.read()), skip=skip)
