"""A kill of the caller's whole cgroup, at any phase of a run, leaves nothing frozen and no script
running (issue 19, attack 4).  `pyexec run` (the command) runs inside a fresh cgroup this test makes
(the caller's: a cgroup v2 leaf, or a v1 freezer and name=systemd pair), on a loop mount, with a
pre-script, the snapshot command or a post-script blocked until the test lets it go; then that cgroup
is killed the way a service manager kills it: `echo 1 > cgroup.kill` on v2; on v1 the freezer frozen,
every member of both cgroups SIGKILLed, thawed (runc's and systemd's kill of each member).  The
guardian and the warden live in pyexec's own cgroups, so the filesystem takes writes again within
the bound, no script is left, and their cgroups go once they are done.  Each kernel profile
(tests/kernel_profile.py) forces pyexec's path: cgroup v2 with and without clone3 CLONE_INTO_CGROUP,
and the v1 freezer with and without pidfds."""
from __future__ import annotations

import contextlib
import glob
import os
import pathlib
import random
import signal
import subprocess
import sys
import time
import uuid

import orjson
import pytest
from helpers import needs_root, procs_matching
from test_config_trust import make, write_setup
from test_freeze_window import writable_within
from test_kill_storm import gone_within, guardian_of

from pyexec import kernel, native

pytestmark = needs_root

HERE = pathlib.Path(__file__).resolve().parent
PYEXEC = os.path.join(os.path.dirname(sys.executable), "pyexec")
BOUND_S = 3.0  # --freeze-timeout of every run
SLACK_S = 10.0
TRIALS = int(os.environ.get("PYEXEC_CGROUP_KILL_TRIALS", "10"))  # per kernel profile
# Profile → the kind of cgroup the caller is in (the one pyexec's scripts use on that profile).
PROFILES = {"native": "v2", "4.18": "v2", "v1": "v1", "4.18-v1": "v1"}
ROOTS = [r for r in (kernel.cgroup2_root(), kernel.freezer_v1_root(), kernel.systemd_v1_root()) if r]
HELPERS = (b"pyexec-guardian", b"pyexec-warden")
NO_PIDFD = {"4.18", "4.18-v1"}


class Caller:
    """The caller's cgroup: made for one test, killed or frozen as a whole, removed afterwards."""

    def __init__(self, kind: str):
        name = f"pxcaller-{uuid.uuid4().hex[:8]}"
        v2, freezer, systemd = kernel.cgroup2_root(), kernel.freezer_v1_root(), kernel.systemd_v1_root()
        assert v2 and freezer and systemd, "this test needs cgroup v2, the v1 freezer and name=systemd mounted"
        self.kind = kind
        self.paths = [os.path.join(v2, name)] if kind == "v2" else [os.path.join(freezer, name),
                                                                     os.path.join(systemd, name)]
        for p in self.paths:
            os.mkdir(p)

    def argv(self, argv: list[str]) -> list[str]:
        """argv started inside this cgroup (it joins before it execs)."""
        join = "for d in $PXCG; do echo $$ > \"$d/cgroup.procs\" || exit 99; done; exec \"$@\""
        return ["env", f"PXCG={' '.join(self.paths)}", "sh", "-c", join, "sh", *argv]

    def rel(self, i: int = 0) -> str:
        """This cgroup's path as /proc/<pid>/cgroup shows it."""
        return "/" + os.path.basename(self.paths[i])

    def members(self) -> set[int]:
        out: set[int] = set()
        for p in self.paths:
            with open(os.path.join(p, "cgroup.procs")) as f:
                out |= {int(x) for x in f.read().split()}
        return out

    def freeze(self, on: bool) -> None:
        """Freeze (or thaw) the whole cgroup: cgroup.freeze on v2, freezer.state on v1."""
        if self.kind == "v2":
            _write(os.path.join(self.paths[0], "cgroup.freeze"), "1" if on else "0")
            want, path = ("frozen 1" if on else "frozen 0"), os.path.join(self.paths[0], "cgroup.events")
        else:
            _write(os.path.join(self.paths[0], "freezer.state"), "FROZEN" if on else "THAWED")
            want, path = ("FROZEN" if on else "THAWED"), os.path.join(self.paths[0], "freezer.state")
        deadline = time.monotonic() + SLACK_S
        while want not in open(path).read():
            assert time.monotonic() < deadline, f"{path} never said {want}"
            time.sleep(0.01)

    def kill(self) -> None:
        """SIGKILL every member: cgroup.kill on v2; on v1 freeze, kill each pid, thaw."""
        if self.kind == "v2":
            _write(os.path.join(self.paths[0], "cgroup.kill"), "1")
            return
        self.freeze(True)
        for pid in self.members():
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.freeze(False)

    def close(self) -> None:
        if self.members():
            self.kill()
        deadline = time.monotonic() + SLACK_S
        while self.members() and time.monotonic() < deadline:
            time.sleep(0.01)
        for p in self.paths:
            os.rmdir(p)
            assert not os.path.exists(p)


def _write(path: str, value: str) -> None:
    with open(path, "w") as f:
        f.write(value)


@pytest.fixture(params=list(PROFILES))
def caller(request):
    c = Caller(PROFILES[request.param])
    c.profile = request.param
    try:
        yield c
    finally:
        c.close()


class Run:
    """One `pyexec run` in the caller's cgroup, with one phase (pre, snapshot, post, or none)
    blocked until release()."""

    def __init__(self, tmp_path, mount, caller: Caller, block: str):
        tmp_path.mkdir(exist_ok=True)
        self.marker = f"cgk-{uuid.uuid4().hex[:8]}"
        self.mount, self.writer = mount
        self.started = tmp_path / f"{block}.started"
        self.fifo = tmp_path / f"{block}.fifo"
        os.mkfifo(self.fifo, 0o600)
        # The blocked step waits on a FIFO in a child that carries the marker, as a script's tree
        # would; the others take a moment in such a child.
        wait = (f"sh -c 'echo > \"$1\"; read x < \"$2\"' {self.marker} {self.started} {self.fifo}\n").encode()
        step = f"sh -c 'sleep 0.05' {self.marker}\n".encode()
        head = b"#!/bin/sh\n"
        cfg = write_setup(tmp_path, pre=head + (wait if block == "pre" else step),
                          post=head + (wait if block == "post" else step),
                          plugin_doc={"preScriptParams": [self.marker], "postScriptParams": [self.marker]})
        snap = make(tmp_path / "etc" / "snap.sh", head + (wait if block == "snapshot" else step))
        self.run_dir = str(tmp_path / "run")
        self.env = {**os.environ, "PYEXEC_RUN_DIR": self.run_dir}
        argv = [sys.executable, str(HERE / "kernel_profile.py"), caller.profile, "--", PYEXEC, "run",
                "--config", cfg, "--mount", self.mount.mountpoint, "--snapshot-cmd", f"{snap} {self.marker}",
                "--freeze-timeout", str(BOUND_S), "--json", "--quiet"]
        self.proc = subprocess.Popen(caller.argv(argv), env=self.env, cwd="/", stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE)
        self.pid = self.proc.pid  # sh, kernel_profile.py and pyexec exec in turn: one pid
        self.profile = caller.profile

    def wait_blocked(self) -> None:
        deadline = time.monotonic() + 60
        while not self.started.exists():
            assert self.proc.poll() is None, f"pyexec ended before the blocked step: {self.proc.communicate()}"
            assert time.monotonic() < deadline, "the blocked step never started"
            time.sleep(0.01)

    def release(self) -> None:
        """Let the blocked step go on (if it still waits: pyexec may have killed it at the bound)."""
        try:
            fd = os.open(self.fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError:  # ENXIO: no reader left
            return
        os.write(fd, b"go\n")
        os.close(fd)

    def status(self) -> str:
        return subprocess.run([PYEXEC, "status"], env=self.env, cwd="/", capture_output=True, text=True,
                              timeout=60).stdout

    def helpers(self) -> list[int]:
        return procs_matching(lambda a: os.path.basename(a[0]) in HELPERS and a[1:2] == [str(self.pid).encode()])

    def assert_cleaned_up(self) -> None:
        """No script and no helper of this run is left, nor its cgroup directories, nor its journal."""
        assert gone_within(lambda a: self.marker.encode() in a, SLACK_S), "a script outlived the run"
        assert gone_within(lambda a: os.path.basename(a[0]) in HELPERS and a[1:2] == [str(self.pid).encode()],
                           SLACK_S), f"a guardian or warden of {self.pid} is left"
        if glob.glob(os.path.join(self.run_dir, "window-*.journal")):
            # Killed after the journal was made and before the guardian ran: nothing was frozen yet
            # (the controller freezes only once its guardian is ready), and recover just removes it.
            status = self.status()
            assert "(dead)" in status and " frozen" not in status and " freezing" not in status, status
            r = subprocess.run([PYEXEC, "recover"], env=self.env, cwd="/", capture_output=True, text=True,
                               timeout=60)
            assert r.stdout.rstrip().endswith("recover: 0 filesystem(s) thawed"), r.stdout
            assert glob.glob(os.path.join(self.run_dir, "window-*.journal")) == []
        left = [d for r in ROOTS if os.path.exists(d := os.path.join(r, "pyexec", str(self.pid)))]
        if left and self.profile in NO_PIDFD:
            # cgroup v1 has no emptiness event and, without pidfd_open, no way to await an exit: a leaf
            # whose last process (a guardian or script the kill caught) was still dying when the warden
            # swept stays, empty, until the next warden's sweep (README, Kernels).  Nothing may run there.
            assert all(os.path.dirname(d) != os.path.join(kernel.cgroup2_root(), "pyexec") for d in left), left
            assert not _procs_under(left), f"processes left in {left}: {_procs_under(left)}"
            _next_warden(self.profile)
            left = [d for d in left if os.path.exists(d)]
        assert not left, f"cgroups left: {left}"


def _procs_under(dirs: list[str]) -> list[str]:
    """The pids in every cgroup under dirs."""
    out = []
    for d in dirs:
        for sub, _, files in os.walk(d):
            if "cgroup.procs" in files:
                with open(os.path.join(sub, "cgroup.procs")) as f:
                    out += f.read().split()
    return out


def _next_warden(profile: str) -> None:
    """Start (and end) one process with a warden under profile: its sweep of dead controllers'
    directories, then its own exit's."""
    code = "import os; from pyexec import cgroups; cgroups.Warden.get(); print(os.getpid())"
    r = subprocess.run([sys.executable, str(HERE / "kernel_profile.py"), profile, "--", sys.executable, "-c", code],
                       capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 0, r.stderr
    pid = r.stdout.strip().encode()
    assert gone_within(lambda a: os.path.basename(a[0]) == b"pyexec-warden" and a[1:2] == [pid], SLACK_S)


def loop_mount(mounts):
    """A new loop mount and a writer on it."""
    m = mounts.make("ext4")
    return m, mounts.writer(os.path.join(m.mountpoint, "f"))


def _cgroups_of(pid: int) -> dict[str, str]:
    """/proc/<pid>/cgroup as {hierarchy's controllers (\"\" for v2): path}."""
    with open(f"/proc/{pid}/cgroup") as f:
        return {line.split(":", 2)[1]: line.split(":", 2)[2].strip() for line in f}


def _hier(kind_path: str) -> str:
    """The /proc/<pid>/cgroup key of the hierarchy mounted at kind_path."""
    return {kernel.cgroup2_root(): "", kernel.freezer_v1_root(): "freezer",
            kernel.systemd_v1_root(): "name=systemd"}[os.path.dirname(kind_path)]


@pytest.mark.parametrize("phase", ["pre", "snapshot", "post"])
def test_kill_of_the_callers_cgroup_leaves_nothing_frozen_or_running(tmp_path, mounts, caller, phase):
    run = Run(tmp_path, loop_mount(mounts), caller, phase)
    try:
        run.wait_blocked()
        assert all(_cgroups_of(run.pid)[_hier(p)] == caller.rel(i) for i, p in enumerate(caller.paths))
        assert procs_matching(lambda a: run.marker.encode() in a), "the blocked step is not running"
        if phase == "snapshot":
            assert f"{run.mount.mountpoint} frozen" in run.status(), "the kill is meant to land inside the window"
        caller.kill()
        run.proc.wait(timeout=SLACK_S)
        assert run.proc.returncode == -signal.SIGKILL
        assert writable_within(run.writer, BOUND_S + SLACK_S) is not None, "the mount stayed frozen"
        run.assert_cleaned_up()
        assert caller.members() == set()
    finally:
        run.proc.kill()
        run.proc.wait()


def test_freeze_of_the_callers_cgroup_does_not_stop_the_guardian(tmp_path, mounts, caller):
    """The caller's cgroup frozen inside the window (cgroup.freeze, the v1 freezer): the guardian, not
    in it, thaws at the bound; the controller, frozen, reports the overrun once thawed."""
    run = Run(tmp_path, loop_mount(mounts), caller, "snapshot")
    try:
        run.wait_blocked()
        caller.freeze(True)
        try:
            assert writable_within(run.writer, BOUND_S + SLACK_S) is not None, "the guardian was frozen too"
        finally:
            caller.freeze(False)
        run.release()
        out, _err = run.proc.communicate(timeout=60)
        doc = orjson.loads(out)
        assert doc["window"]["guardian"] == "fired:deadline", doc["window"]
        assert run.proc.returncode != 0 and doc["outcome"] != "app-consistent", doc["outcome"]
        run.assert_cleaned_up()
    finally:
        run.proc.kill()
        run.proc.wait()


def test_guardian_and_warden_are_outside_the_callers_cgroup(tmp_path, mounts, caller):
    """Inside the window the guardian is in pyexec's own guard leaf and the warden in pyexec's
    directory, in every hierarchy the caller is in; the run then completes and the leaf goes."""
    run = Run(tmp_path, loop_mount(mounts), caller, "snapshot")
    try:
        run.wait_blocked()
        g = guardian_of(run.pid, SLACK_S)
        assert g is not None
        helpers = run.helpers()
        assert g in helpers and len(helpers) == 2, helpers
        # pyexec's hierarchies on this profile: cgroup v2 (unless hidden), the v1 freezer, name=systemd.
        keys = (["", "freezer", "name=systemd"] if caller.kind == "v2" else ["freezer", "name=systemd"])
        for pid in helpers:
            where = _cgroups_of(pid)
            ours = f"/pyexec/{run.pid}/guard" if pid == g else "/pyexec"  # the guardian's leaf; the warden's
            assert [where[k] for k in keys] == [ours] * len(keys), (pid, where)
            assert all(where[_hier(p)] != caller.rel(i) for i, p in enumerate(caller.paths)), (pid, where)
        run.release()
        out, _ = run.proc.communicate(timeout=60)
        assert run.proc.returncode == 0 and orjson.loads(out)["outcome"] == "app-consistent"
        run.assert_cleaned_up()
    finally:
        run.proc.kill()
        run.proc.wait()


def test_kill_of_the_callers_cgroup_at_random_instants(tmp_path, mounts, caller):
    """The caller's cgroup killed at random instants of whole runs (TRIALS of them): also between the
    guardian's spawn and its readiness, inside a FIFREEZE, between a script's end and the next."""
    m = loop_mount(mounts)
    t0 = time.monotonic()
    first = Run(tmp_path / "first", m, caller, "none")
    out, err = first.proc.communicate(timeout=120)
    span = time.monotonic() - t0
    assert first.proc.returncode == 0 and orjson.loads(out)["outcome"] == "app-consistent", err
    rng = random.Random(int(os.environ.get("PYEXEC_KILL_SEED", "7")))
    for i in range(TRIALS):
        mounts.rearm()
        c = Caller(caller.kind)
        c.profile = caller.profile
        try:
            run = Run(tmp_path / f"t{i}", m, c, "none")
            try:
                time.sleep(rng.uniform(0, span * 1.1))
                c.kill()
                run.proc.wait(timeout=SLACK_S)
                assert writable_within(run.writer, BOUND_S + SLACK_S) is not None, f"trial {i}: the mount stayed frozen"
                run.assert_cleaned_up()
            finally:
                run.proc.kill()
                run.proc.wait()
        finally:
            c.close()


def test_spawn_helper_starts_inside_every_cgroup_and_outlives_its_spawner(nat, tmp_path):
    """px_spawn_helper, with each binding: the child is inside every cgroup given (one per hierarchy:
    cgroup v2, the v1 freezer, name=systemd) before its first instruction, and lives on when the
    process that spawned it is SIGKILLed while it is in a v1 cgroup it joined itself (a script
    joined that way would die with it: PR_SET_PDEATHSIG)."""
    name = f"pxhelper-{uuid.uuid4().hex[:8]}"
    dirs = [os.path.join(r, name) for r in ROOTS]
    keys = [_hier(d) for d in dirs]
    for d in dirs:
        os.mkdir(d)
    fds = [os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for d in dirs]
    try:
        out = nat.new_capture()
        p = nat.spawn_helper(["/bin/cat", "/proc/self/cgroup"], "/bin/cat", cgroup_fds=fds)
        try:
            st = nat.wait(p, out=out)
        finally:
            p.close()
        assert st is not None and st.code == 0
        where = {ln.split(":", 2)[1]: ln.split(":", 2)[2] for ln in native.read_capture(out).data.decode().splitlines()}
        assert [where[k] for k in keys] == [f"/{name}"] * len(keys), where
        freezer = dirs[ROOTS.index(kernel.freezer_v1_root())]
        code = ("import os, sys; from pyexec import native\n"
                "fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)\n"
                "p = native.load(sys.argv[2]).spawn_helper(['/bin/sleep', '60'], '/bin/sleep', cgroup_fds=[fd])\n"
                "print(p.pid, flush=True)\n"
                "os.kill(os.getpid(), 9)\n")
        r = subprocess.run([sys.executable, "-c", code, freezer, nat.name], capture_output=True, text=True, cwd="/",
                           timeout=60)
        assert r.returncode == -signal.SIGKILL, r.stderr
        orphan = int(r.stdout)
        # The kernel sends PR_SET_PDEATHSIG's signal as the spawner exits, before it is reaped; give
        # that SIGKILL a moment to finish the process.
        time.sleep(0.2)
        with open(f"/proc/{orphan}/stat", "rb") as f:
            assert f.read().rpartition(b")")[2].split()[0] != b"Z", "the helper died with its spawner"
        assert _cgroups_of(orphan)["freezer"] == f"/{name}"
    finally:
        for fd in fds:
            os.close(fd)
        deadline = time.monotonic() + SLACK_S
        while _procs_under(dirs) and time.monotonic() < deadline:  # the orphan, or whatever a failure left
            for pid in _procs_under(dirs):
                with contextlib.suppress(ProcessLookupError):
                    os.kill(int(pid), signal.SIGKILL)
            time.sleep(0.01)
        for d in dirs:
            os.rmdir(d)
