"""The suite under each kernel profile (tests/kernel_profile.py): a seccomp filter answers pyexec's
syscalls as RHEL 8 (4.18), Ubuntu 20.04 (5.4) or 5.7 would, and cgroup v2 (or every cgroup) is hidden.
Under each, every feature the probe reports must be on exactly where the profile leaves it and this
kernel has it (checked here, without pyexec: the syscall made, the cgroup file looked for), and the
kernel paths report the feature or its fallback accordingly; then the spawn, scripts, freeze, host,
safefreeze, promise and kill-storm tests must pass (with both bindings where a test takes `nat`)."""
from __future__ import annotations

import contextlib
import ctypes
import errno
import functools
import os
import pathlib
import signal
import subprocess
import sys
import uuid
import xml.etree.ElementTree as ET

import kernel_profile
import orjson
import pytest
from helpers import needs_root

pytestmark = needs_root

HERE = pathlib.Path(__file__).resolve().parent
MODULES = ["test_native_spawn.py", "test_freeze_window.py", "test_host.py", "test_safefreeze.py",
           "test_promises.py", "test_kill_storm.py"]
# x86_64 numbers, as kernel_profile's filter knows them.
NR_CLONE3, NR_CLOSE_RANGE, NR_OPENAT2 = 435, 436, 437
CLONE_INTO_CGROUP, CLOSE_RANGE_CLOEXEC = 0x200000000, 4
RESOLVE_NO_SYMLINKS = 0x04
_libc = ctypes.CDLL(None, use_errno=True)
_libc.syscall.restype = ctypes.c_long


def under(profile: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "kernel_profile.py"), profile, "--", *argv],
                          capture_output=True, text=True, cwd="/", **kw)


def _syscall_errno(nr: int, *args) -> int:
    """0 if the syscall succeeded (a returned fd is closed), else its errno."""
    r = _libc.syscall(ctypes.c_long(nr), *args)
    if r < 0:
        return ctypes.get_errno()
    if nr == NR_CLONE3:  # cannot happen with a non-cgroup fd; if it does, be the child no longer, reap it
        if r == 0:
            os._exit(127)
        os.waitpid(r, 0)
    elif nr == NR_OPENAT2:
        os.close(r)
    return 0


def _mounted(fstype: str, option: str | None = None) -> str | None:
    with open("/proc/self/mountinfo") as f:
        for line in f:
            left, _, right = line.partition(" - ")
            rf = right.split()
            if rf[:1] == [fstype] and (option is None or option in rf[2].split(",")):
                return left.split()[4]
    return None


@contextlib.contextmanager
def _own_cgroup2(root: str):
    """A cgroup v2 directory of this test's making (another witness than the probe's), removed after."""
    path = os.path.join(root, f"pyexec-test-{uuid.uuid4().hex[:8]}")
    os.mkdir(path)
    try:
        yield path
    finally:
        os.rmdir(path)


@functools.cache
def kernel_has() -> dict[str, bool]:
    """What this kernel has, found without pyexec: each syscall made as harmlessly as it can be,
    each cgroup file looked for in a non-root cgroup v2 directory made for the purpose."""
    has = {}
    try:
        pidfd = os.pidfd_open(os.getpid())
    except OSError:
        pidfd = -1
    has["pidfd_open"] = pidfd >= 0
    if pidfd >= 0:
        try:  # ourselves: no child of ours, ECHILD; a kernel without P_PIDFD (before 5.4) EINVAL
            os.waitid(os.P_PIDFD, pidfd, os.WEXITED | os.WNOHANG)
            has["waitid_pidfd"] = True
        except ChildProcessError:
            has["waitid_pidfd"] = True
        except OSError:
            has["waitid_pidfd"] = False
        os.close(pidfd)
    else:
        has["waitid_pidfd"] = False
    with open("/dev/null", "rb") as not_cgroup:  # CLONE_INTO_CGROUP checks its fd first: EBADF
        args = (ctypes.c_uint64 * 11)(CLONE_INTO_CGROUP, 0, 0, 0, signal.SIGCHLD, 0, 0, 0, 0, 0,
                                         not_cgroup.fileno())
        has["clone3_cgroup"] = _syscall_errno(NR_CLONE3, args, ctypes.c_size_t(ctypes.sizeof(args))) == errno.EBADF
    has["close_range_cloexec"] = _syscall_errno(NR_CLOSE_RANGE, ctypes.c_uint(2**32 - 2), ctypes.c_uint(2**32 - 2),
                                                ctypes.c_uint(CLOSE_RANGE_CLOEXEC)) == 0
    how = (ctypes.c_uint64 * 3)(os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS)
    has["openat2"] = _syscall_errno(NR_OPENAT2, ctypes.c_int(-100), b"/", how, ctypes.c_size_t(24)) == 0
    root = _mounted("cgroup2")
    has["cgroup2"] = root is not None
    has["cgroup_v1"] = _mounted("cgroup") is not None
    has["cgroup_kill"] = has["cgroup_freeze"] = False
    if root is not None:
        with _own_cgroup2(root) as d:
            has["cgroup_kill"] = os.path.exists(os.path.join(d, "cgroup.kill"))
            has["cgroup_freeze"] = os.path.exists(os.path.join(d, "cgroup.freeze"))
    return has


def expected_paths(f: dict[str, bool]) -> dict[str, str]:
    """What the kernel paths must say for these features: each one's own path, or its fallback."""
    freezer = f["cgroup_v1"] and _mounted("cgroup", "freezer") is not None
    if f["cgroup2"]:
        kill = ("cgroup.kill" if f["cgroup_kill"] else "cgroup freeze + kill + thaw" if f["cgroup_freeze"]
                else "kill of each pid in cgroup.procs")
        join = "clone3 CLONE_INTO_CGROUP" if f["clone3_cgroup"] else "vfork child writes cgroup.procs"
    elif freezer:
        kill = ("cgroup v1 freezer: freeze, kill each pid, thaw, await their pidfds" if f["pidfd_open"]
                else "cgroup v1 freezer: freeze, kill each pid, thaw (one pass: no pidfd to await them)")
        join = "vfork child writes cgroup.procs (cgroup v1 freezer)"
    else:
        kill = "process group (no cgroup; the script dies with pyexec by PR_SET_PDEATHSIG)"
        join = "none (no cgroup)"
    return {
        "child waits": "pidfd" if f["pidfd_open"] else "waiter thread + pipe (no pidfd_open)",
        "reaping": "waitid P_PIDFD" if f["waitid_pidfd"] else "waitid P_PID",
        "cgroup join": join,
        "tree kill": kill,
        "fd closing": "close_range" if f["close_range_cloexec"] else "/proc/self/fd walk",
        "guardian watch": "pidfd" if f["pidfd_open"] else "life pipe hang-up",
        "mount open": ("openat2 RESOLVE_NO_SYMLINKS" if f["openat2"]
                       else "O_NOFOLLOW walk, one component at a time (no openat2: before 5.6)"),
    }


@pytest.mark.parametrize("profile", ["4.18", "4.18-v1", "5.4", "5.7", "v1", "nocgroup"])
def test_suite_under_kernel_profile(profile, tmp_path):
    probe = under(profile, sys.executable, "-c",
                  "import orjson; from pyexec import kernel, native\n"
                  "print(orjson.dumps({n: native.load(n).features() for n in ('cython', 'cffi')}).decode())\n"
                  "print(orjson.dumps(dict(kernel.features())).decode())\n"
                  "print(orjson.dumps(kernel.kernel_paths()).decode())", timeout=60)
    assert probe.returncode == 0, probe.stderr
    feats, used, paths = map(orjson.loads, probe.stdout.splitlines())
    allowed = kernel_profile.allows(profile, os.environ.get("PYEXEC_DISABLE", ""))
    has = kernel_has()
    assert set(used) == set(allowed) == set(has), "a feature the profiles do not know"
    want = {f: allowed[f] and has[f] for f in allowed}
    for f, wanted in want.items():
        why = "the profile takes it away" if not allowed[f] else "this kernel has it" if has[f] else "this kernel lacks it"
        assert feats["cython"][f] == feats["cffi"][f] == used[f] == wanted, f"{f}: {why}, the probe says {used[f]}"
    # Each job's path follows from those features: a feature taken away is reported by its fallback.
    guard = paths.pop("guardian and warden")
    assert paths == expected_paths(want)
    own = paths["cgroup join"] != "none (no cgroup)"
    assert guard.startswith("pyexec/<pid>/guard in " if own else "the caller's cgroup"), guard
    junit = tmp_path / "junit.xml"
    env = {**os.environ, "PYEXEC_KILL_TRIALS": "35"}
    run = under(profile, sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "300",
                "--benchmark-disable", "--rootdir", str(HERE.parent), "-c", str(HERE.parent / "pyproject.toml"),
                "--junitxml", str(junit), *[str(HERE / m) for m in MODULES], env=env, timeout=1200)
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    suite = ET.parse(junit).getroot().find("testsuite")
    assert suite is not None and int(suite.get("tests", 0)) - int(suite.get("skipped", 0)) > 0, "nothing ran"
