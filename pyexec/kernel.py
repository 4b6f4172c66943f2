"""What this machine's kernel offers pyexec, and which path each kernel-dependent job takes on it.

The features are the native core's probes (native/probe.c: each a real probe of the running kernel,
made once per process, each forced off by its name in PYEXEC_DISABLE, which only the core reads);
the cgroup hierarchies are found in mountinfo once the core says they are there.  Everything that
chooses a path by the kernel (identity, cgroups, scripts, safefreeze) or reports one (`pyexec check`,
`pyexec status`, the JSON report) reads it here."""
from __future__ import annotations

import contextlib
import functools
import types
from collections.abc import Mapping

from pyexec import native


@functools.cache
def features() -> Mapping[str, bool]:
    """The kernel features in use (True) or replaced by their fallback (False), as the core probed
    them (once per process): pyexec_core.h's px_features, by field name."""
    return types.MappingProxyType(native.default().features())


def _v1_root(option: str, mountinfo: str) -> str | None:
    """Where the cgroup v1 hierarchy with this mount option (a controller, "name=systemd") is mounted."""
    with contextlib.suppress(OSError), open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            rf = right.split()
            if rf[:1] == ["cgroup"] and len(rf) >= 3 and option in rf[2].split(","):
                return left.split()[4]
    return None


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where cgroup v2 is mounted, or None (also when PYEXEC_DISABLE names cgroup2)."""
    if not features()["cgroup2"]:
        return None
    # The first entry, as the core's probe takes it (its cgroup.kill and cgroup.freeze are that mount's).
    with contextlib.suppress(OSError), open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


def freezer_v1_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where the cgroup v1 freezer hierarchy is mounted, or None (also when PYEXEC_DISABLE names
    cgroup_v1): the scripts' cgroups on a machine without a usable cgroup v2."""
    return _v1_root("freezer", mountinfo) if features()["cgroup_v1"] else None


def systemd_v1_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where systemd's own cgroup v1 hierarchy (name=systemd) is mounted, or None (also when
    PYEXEC_DISABLE names cgroup_v1): a v1 or hybrid systemd finds a unit's processes there."""
    return _v1_root("name=systemd", mountinfo) if features()["cgroup_v1"] else None


def cgroup_root() -> tuple[str, str] | None:
    """Where the scripts' cgroups go: (cgroup v2 mount, "v2"), else (v1 freezer mount, "v1"), else None."""
    v2 = cgroup2_root()
    if v2:
        return v2, "v2"
    v1 = freezer_v1_root()
    return (v1, "v1") if v1 else None


def hierarchies() -> list[str]:
    """The mounts of every hierarchy pyexec keeps its own cgroups in: the scripts' first, then the
    v1 freezer and name=systemd where mounted (a kill or freeze of the caller can come through each)."""
    found = cgroup_root()
    if found is None:
        return []  # no usable cgroup: nothing of pyexec's own anywhere
    out = [found[0]]
    for root in (freezer_v1_root(), systemd_v1_root()):
        if root and root not in out:
            out.append(root)
    return out


def kernel_paths() -> dict[str, str]:
    """Which path each kernel-dependent job takes on this machine (probed once): for `pyexec
    check`, `pyexec status` and the report."""
    f = features()
    cg = cgroup_root()
    if cg is None:
        kill = "process group (no cgroup; the script dies with pyexec by PR_SET_PDEATHSIG)"
        join = "none (no cgroup)"
    elif cg[1] == "v1":
        kill = ("cgroup v1 freezer: freeze, kill each pid, thaw, await their pidfds" if f["pidfd_open"]
                else "cgroup v1 freezer: freeze, kill each pid, thaw (one pass: no pidfd to await them)")
        join = "vfork child writes cgroup.procs (cgroup v1 freezer)"
    else:
        kill = ("cgroup.kill" if f["cgroup_kill"] else "cgroup freeze + kill + thaw" if f["cgroup_freeze"]
                else "kill of each pid in cgroup.procs")
        join = "clone3 CLONE_INTO_CGROUP" if f["clone3_cgroup"] else "vfork child writes cgroup.procs"
    return {
        "child waits": "pidfd" if f["pidfd_open"] else "waiter thread + pipe (no pidfd_open)",
        "reaping": "waitid P_PIDFD" if f["waitid_pidfd"] else "waitid P_PID",
        "cgroup join": join,
        "tree kill": kill,
        "fd closing": "close_range" if f["close_range_cloexec"] else "/proc/self/fd walk",
        "guardian watch": "pidfd" if f["pidfd_open"] else "life pipe hang-up",
        "mount open": ("openat2 RESOLVE_NO_SYMLINKS" if f["openat2"]
                       else "O_NOFOLLOW walk, one component at a time (no openat2: before 5.6)"),
        "guardian and warden": (f"pyexec/<pid>/guard in {', '.join(hierarchies())} (outside the caller's cgroup)"
                                if cg else "the caller's cgroup (no cgroup of pyexec's own)"),
    }
