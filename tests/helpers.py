"""Test helpers: capability marks, loop mounts with a watchdog, a writer process."""
from __future__ import annotations

import contextlib
import functools
import mmap
import os
import pathlib
import shutil
import struct
import subprocess
import sys
import tempfile
import threading
import time

import pytest

from pyexec import native
from pyexec.demo import loopfs

IS_ROOT = os.geteuid() == 0
needs_root = pytest.mark.skipif(not IS_ROOT, reason="needs root: FIFREEZE, loop devices and mount")
needs_xfs = pytest.mark.skipif(shutil.which("mkfs.xfs") is None, reason="mkfs.xfs (xfsprogs) not installed")
needs_btrfs = pytest.mark.skipif(shutil.which("mkfs.btrfs") is None, reason="mkfs.btrfs (btrfs-progs) not installed")

WATCHDOG_S = 30.0
BACKENDS = ["cython", "cffi"]


class Mounts:
    """Factory of loop mounts for one test, with a watchdog thaw and a thorough teardown."""

    def __init__(self, tmp_path):
        self.tmp = tmp_path
        self.items: list[loopfs.LoopFS] = []
        self.writers: list[subprocess.Popen] = []
        self.fired = False
        self.timer = None
        self.rearm()

    def rearm(self):
        """Restart the watchdog: a long test calls this per step, so only one step must fit in it."""
        if self.timer is not None:
            self.timer.cancel()
        self.timer = threading.Timer(WATCHDOG_S, self._watchdog)
        self.timer.daemon = True
        self.timer.start()

    def _watchdog(self):
        # A test that hangs with a mount frozen would hang every writer after it.
        self.fired = True
        for m in self.items:
            m.thaw()

    def make(self, fstype: str, size_mb: int | None = None, image_dir=None, mountpoint=None) -> loopfs.LoopFS:
        """A new mounted filesystem of fstype (its image in image_dir, default the test's tmp dir; mounted at
        mountpoint, default a new directory of the test's tmp dir)."""
        i = len(self.items)
        image = os.path.join(image_dir or self.tmp, f"img{i}.{fstype}")
        m = loopfs.LoopFS(image, str(mountpoint or self.tmp / f"mnt{i}"), fstype, size_mb)
        self.items.append(m)
        return m

    def writer(self, path: str) -> Writer:
        """A process writing to path in a tight loop, counting its completed writes."""
        w = Writer(path, self.tmp / f"counter{len(self.writers)}")
        self.writers.append(w.proc)
        return w

    def close(self):
        """Thaw, stop the writers, unmount and detach every mount: each step is tried whatever the one
        before it raised (a writer that would not die must not leave the mounts attached), and the
        first error is raised at the end."""
        self.timer.cancel()
        steps = [m.thaw for m in self.items]  # thaw first: a writer blocked on a frozen fs ignores SIGKILL
        for p in self.writers:
            steps += [p.kill, functools.partial(p.wait, timeout=10)]
        steps += [m.close for m in reversed(self.items)]
        first: BaseException | None = None
        for step in steps:
            try:
                step()
            except Exception as e:  # noqa: BLE001 - kept and raised once every mount is detached
                first = first or e
        if first is not None:
            raise first


WRITER_CODE = r"""
import mmap, os, struct, sys
path, counter = sys.argv[1], sys.argv[2]
cfd = os.open(counter, os.O_RDWR)
c = mmap.mmap(cfd, 8)
fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
n = 0
block = b"x" * 4096
while True:
    os.pwrite(fd, block, (n % 256) * 4096)
    n += 1
    struct.pack_into("=Q", c, 0, n)
"""


class Writer:
    """A child process writing to a file; `count()` is its number of completed writes."""

    def __init__(self, path, counter_path):
        with open(counter_path, "wb") as f:
            f.write(b"\0" * 8)
        fd = os.open(counter_path, os.O_RDWR)
        self.map = mmap.mmap(fd, 8)
        os.close(fd)
        self.proc = subprocess.Popen([sys.executable, "-c", WRITER_CODE, path, str(counter_path)])
        deadline = time.monotonic() + 10
        while self.count() == 0:
            assert time.monotonic() < deadline, "writer never started"
            time.sleep(0.005)

    def count(self) -> int:
        return struct.unpack_from("=Q", self.map, 0)[0]


def procs_matching(pred) -> list[int]:
    """Pids of the live processes whose argv (a list of bytes) satisfies pred."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/cmdline", "rb") as f:
                    argv = f.read().split(b"\0")
            except OSError:
                continue
            if pred(argv):
                out.append(int(d))
    return out


DB_EXES = {"postgres", "mariadbd", "mysqld", "pgbench"}


def db_procs_under(root: str) -> list[str]:
    """Database server processes (and pgbench) working in a directory under root: a postmaster and
    its workers, a mariadbd, each with its data directory as cwd."""
    found = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                exe = os.path.basename(os.readlink(f"/proc/{d}/exe"))
                cwd = os.readlink(f"/proc/{d}/cwd")
            except OSError:
                continue
            if exe in DB_EXES and (cwd == root or cwd.startswith(root + "/")):
                found.append(f"{d} {exe} in {cwd}")
    return found


@contextlib.contextmanager
def db_sandbox(prefix: str, make):
    """make(tmp, mounts): a database server's site, with .close(), in a directory its OS user can reach
    (pytest's tmp_path is 0700); afterwards no server, mount or loop device of it is left."""
    with tempfile.TemporaryDirectory(prefix=prefix) as tmp:
        os.chmod(tmp, 0o711)
        mounts = Mounts(pathlib.Path(tmp))
        try:
            site = make(pathlib.Path(tmp), mounts)
            try:
                yield site
            finally:
                site.close()
        finally:
            mounts.close()
        assert not mounts.fired, "watchdog fired: a mount was left frozen"
        assert tmp not in open("/proc/self/mountinfo").read()
        assert db_procs_under(tmp) == []


def open_fds() -> set[int]:
    """This process's open fds."""
    return {int(x) for x in os.listdir("/proc/self/fd")}


# Fixtures, registered by tests/conftest.py and benchmarks/conftest.py importing them.
@pytest.fixture(params=BACKENDS)
def nat(request) -> native.Native:
    """Each test that takes `nat` runs once per binding."""
    try:
        return native.load(request.param)
    except ImportError as err:
        pytest.fail(f"backend {request.param} is not built: {err}")


@pytest.fixture
def mounts(tmp_path):
    """Loop mounts that are thawed, unmounted and detached whatever the test does."""
    if not IS_ROOT:
        pytest.skip("needs root: loop devices and mount")
    m = Mounts(tmp_path)
    try:
        yield m
    finally:
        m.close()
    assert not m.fired, f"watchdog fired after {WATCHDOG_S}s: the test left a mount frozen"


@pytest.fixture
def no_fd_leak():
    """Fails the test if it leaves fds open in this process."""
    before = open_fds()
    yield
    leaked = open_fds() - before
    # listdir's own fd is gone by the time it returns; anything else is a leak.
    assert not leaked, f"fds leaked: {sorted(leaked)}"



class LocalUser:
    """A real unprivileged account made for one test: the attacker of the hostile tests."""

    def __init__(self, name: str, home: pathlib.Path):
        import pwd
        self.name = name
        pw = pwd.getpwnam(name)
        self.uid, self.gid, self.home = pw.pw_uid, pw.pw_gid, home

    def argv(self, argv: list[str]) -> list[str]:
        """argv run as this user (real and effective ids, no supplementary groups, no capabilities)."""
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--clear-groups",
                "--inh-caps=-all", "--bounding-set=-all", "--", *argv]

    def run(self, argv: list[str], **kw) -> subprocess.CompletedProcess:
        """Run argv as this user and wait (cwd: its home; output captured as text unless told)."""
        kw.setdefault("capture_output", True)
        kw.setdefault("text", True)
        kw.setdefault("timeout", 60)
        kw.setdefault("cwd", self.home)
        return subprocess.run(self.argv(argv), **kw)

    def popen(self, argv: list[str], **kw) -> subprocess.Popen:
        """Start argv as this user."""
        kw.setdefault("cwd", self.home)
        return subprocess.Popen(self.argv(argv), **kw)

    def chown(self, path: str | os.PathLike) -> None:
        """Give path to this user (the directory an attacker owns)."""
        os.chown(path, self.uid, self.gid)


@pytest.fixture
def local_user(tmp_path_factory):
    """A fresh unprivileged user (useradd), removed with every process it left (userdel)."""
    if not IS_ROOT:
        pytest.skip("needs root: useradd")
    name = f"pxu{os.getpid() % 100000}{next(_user_seq)}"
    home = tmp_path_factory.mktemp(name)
    subprocess.run(["useradd", "--system", "--no-create-home", "--home-dir", str(home), "--shell", "/bin/sh",
                    "--user-group", name], check=True, capture_output=True)
    user = LocalUser(name, home)
    os.chown(home, user.uid, user.gid)
    os.chmod(home, 0o755)
    try:
        yield user
    finally:
        subprocess.run(["pkill", "-KILL", "-U", str(user.uid)], capture_output=True)
        deadline = time.monotonic() + 10
        while _procs_of(user.uid) and time.monotonic() < deadline:
            time.sleep(0.05)
        left = _procs_of(user.uid)
        subprocess.run(["userdel", name], capture_output=True)
        assert not left, f"processes of {name} outlived the test: {left}"


_user_seq = iter(range(1 << 30))


def _procs_of(uid: int) -> list[int]:
    """The live (not zombie) processes of uid."""
    out = []
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, IndexError):
                with open(f"/proc/{d}/stat", "rb") as f:
                    state = f.read().rpartition(b")")[2].split()[0]
                if os.stat(f"/proc/{d}").st_uid == uid and state not in (b"Z", b"X"):
                    out.append(int(d))
    return out


def kill_with_descendants(pids) -> None:
    """SIGKILL pids and every process descended from them (a test's daemons and their children)."""
    parent = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            try:
                with open(f"/proc/{d}/stat", "rb") as f:
                    parent[int(d)] = int(f.read().rpartition(b")")[2].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    doomed = set(pids)
    grew = True
    while grew:
        more = {p for p, pp in parent.items() if pp in doomed} - doomed
        doomed |= more
        grew = bool(more)
    for p in doomed:
        try:
            os.kill(p, 9)
        except ProcessLookupError:
            pass


@pytest.fixture
def run_tmpfs(tmp_path):
    """A run directory on a tmpfs of its own (as /run is on most machines; here /run is on `/`): the
    journal page is then the file itself, and recover knows each mount's last state.  Unmounted after."""
    if not IS_ROOT:
        pytest.skip("needs root: mount")
    d = tmp_path / "run-tmpfs"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m,mode=0700", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=True)
