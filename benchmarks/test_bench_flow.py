"""The plugin host's speed against a polling baseline that works the way the reference does, in one run:
full-run overhead, the stall an application feels, the freeze window's breakdown across filesystems,
mount counts, dirty data and snapshot kinds, timeout precision, and scale in plugins.

Each benchmark stores its own measurements in `extra_info` (ns); benchmarks/report.py turns the JSON
into results/bench.md and results/window-overhead.png."""
from __future__ import annotations

import os
import time

import pytest
from baseline import PollingHost, StallProbe
from helpers import Mounts, needs_root
from test_config_trust import make, write_setup

from pyexec import host, native, scripts, trust, window

pytestmark = needs_root

NOOP = b"#!/bin/sh\nexit 0\n"
POLLING = {"poll1s": PollingHost(1.0), "poll3s": PollingHost(3.0), "poll3s+delay3s": PollingHost(3.0, 3.0)}


@pytest.fixture(scope="module")
def pool(tmp_path_factory):
    """Loop mounts shared by the module's benchmarks: 16 each of ext4, xfs and btrfs, made on first use."""
    made: dict[str, list] = {}
    ms = Mounts(tmp_path_factory.mktemp("pool"))

    def get(fstype: str, n: int):
        ms.rearm()
        have = made.setdefault(fstype, [])
        while len(have) < n:
            have.append(ms.make(fstype, size_mb=256))  # room for the dirty data
        return have[:n]

    yield get
    ms.close()


# ---- 1. full run: check + pre + freeze + no-op snapshot + thaw + post -------------------------------

@pytest.mark.benchmark(group="full run, no-op scripts, 1 ext4")
def test_full_run_pyexec(benchmark, pool, tmp_path):
    (m,) = pool("ext4", 1)
    hc = write_setup(tmp_path, pre=NOOP, post=NOOP)

    def run():
        rep = host.run(hc, mount_points=[m.mountpoint], freeze_timeout=30)
        assert rep.outcome == host.APP

    benchmark.pedantic(run, rounds=30, warmup_rounds=2)


@pytest.mark.benchmark(group="full run, no-op scripts, 1 ext4")
@pytest.mark.parametrize("variant", list(POLLING))
def test_full_run_polling_baseline(benchmark, pool, tmp_path, variant):
    (m,) = pool("ext4", 1)
    pre, post = make(tmp_path / "pre.sh", NOOP), make(tmp_path / "post.sh", NOOP)
    benchmark.pedantic(POLLING[variant].run, args=(pre, post, [m.mountpoint]), rounds=3)


# ---- 2. the stall an application feels -----------------------------------------------------------

def _pyexec_window(paths, expedite):
    with window.freeze(paths, timeout=30, expedite=expedite, presync=True):
        pass


STALL_ACTIONS = {
    "pyexec expedited": lambda p: _pyexec_window(p, True),
    "pyexec plain": lambda p: _pyexec_window(p, False),
    "util-linux fsfreeze": lambda p: PollingHost(0).freeze_thaw(p),
    "polling baseline 1s": lambda p: PollingHost(1.0).freeze_thaw(p),
}


@pytest.mark.benchmark(group="application-visible stall, idle ext4")
@pytest.mark.parametrize("action", list(STALL_ACTIONS))
def test_stall_felt_by_a_writer(benchmark, pool, tmp_path, action):
    (m,) = pool("ext4", 1)
    probe = StallProbe(os.path.join(m.mountpoint, "probe"), str(tmp_path / "probe.shm"))
    gaps = []

    def once():
        probe.wait_writes(50)
        probe.reset()
        STALL_ACTIONS[action]([m.mountpoint])
        probe.wait_writes(50)
        gaps.append(probe.worst_gap_ns())

    try:
        benchmark.pedantic(once, rounds=3 if "polling" in action else 25)
    finally:
        probe.close()
    benchmark.extra_info["stall_ns"] = gaps


def _bare_ioctls(nat, paths, flags):
    """FIFREEZE+FITHAW through the native core alone: no guardian, lock or journal (the floor)."""
    fds = [os.open(p, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC) for p in paths]
    try:
        buf = nat.new_set()
        nat.set_init(buf, fds)
        assert nat.freeze(buf, flags) == 0
        nat.thaw(buf)
    finally:
        for fd in fds:
            os.close(fd)


TAIL_ROUNDS = int(os.environ.get("PYEXEC_STALL_ROUNDS", "100"))


@pytest.mark.benchmark(group="stall tail, interleaved, idle ext4")
def test_stall_tail_interleaved(benchmark, pool, tmp_path):
    """The worst stall a writer feels, over TAIL_ROUNDS rounds in which each way of freezing takes its
    turn (so the machine's noise falls on all of them alike): `pyexec run`, the expedited in-process
    floor, plain ioctls, util-linux fsfreeze."""
    (m,) = pool("ext4", 1)
    hc = write_setup(tmp_path, pre=NOOP, post=NOOP)
    nat = native.default()
    actions = {
        "pyexec run": lambda: host.run(hc, mount_points=[m.mountpoint], freeze_timeout=30),
        # The floor: what pyexec's window does (presync, then expedited FIFREEZE), with nothing around it.
        "expedited ioctls (floor)": lambda: _bare_ioctls(nat, [m.mountpoint],
                                                         native.FREEZE_EXPEDITE | native.FREEZE_PRESYNC),
        "plain ioctls": lambda: _bare_ioctls(nat, [m.mountpoint], 0),
        "util-linux fsfreeze": lambda: PollingHost(0).freeze_thaw([m.mountpoint]),
    }
    probe = StallProbe(os.path.join(m.mountpoint, "probe"), str(tmp_path / "probe.shm"))
    gaps: dict[str, list[int]] = {a: [] for a in actions}
    # A smoke test (`make test`, benchmarks disabled) takes a few rounds; `make bench` takes them all.
    rounds = 3 if benchmark.disabled else TAIL_ROUNDS

    def run_all():
        for i in range(rounds):
            order = list(actions)
            order = order[i % len(order):] + order[:i % len(order)]  # each goes first as often
            for a in order:
                probe.wait_writes(50)
                probe.reset()
                actions[a]()
                probe.wait_writes(50)
                gaps[a].append(probe.worst_gap_ns())

    try:
        benchmark.pedantic(run_all, rounds=1, iterations=1)
    finally:
        probe.close()
    benchmark.extra_info["stall_ns"] = gaps


# ---- 3. the freeze window, broken down -----------------------------------------------------------

DIRTY_BYTES = 50 << 20


def _dirty(paths):
    chunk = os.urandom(1 << 20)
    per = max(1, DIRTY_BYTES // len(paths) >> 20)
    for p in paths:
        with open(os.path.join(p, "dirty"), "wb") as f:
            f.writelines(chunk for _ in range(per))


@pytest.mark.benchmark(group="freeze window")
@pytest.mark.parametrize("snapshot", ["callback", "command"])
@pytest.mark.parametrize("load", ["idle", "dirty"])
@pytest.mark.parametrize("count", [1, 4, 16])
@pytest.mark.parametrize("fstype", ["ext4", "xfs", "btrfs"])
def test_window(benchmark, pool, fstype, count, load, snapshot):
    paths = [m.mountpoint for m in pool(fstype, count)]
    nat = native.default()
    wins = []

    def once():
        with window.freeze(paths, timeout=60, backend=nat) as w:
            if snapshot == "command":
                p = nat.spawn(["/bin/true"], {}, path="/bin/true")
                nat.wait(p, -1)
                p.close()
        assert w.error is None
        wins.append(w)

    setup = (lambda: _dirty(paths)) if load == "dirty" else None
    benchmark.pedantic(once, setup=setup, rounds=8 if load == "dirty" else 30)
    benchmark.extra_info.update({
        "fstype": fstype, "mounts": count, "load": load, "snapshot": snapshot,
        "length_ns": [w.length_ns for w in wins], "ioctl_ns": [w.ioctl_ns for w in wins],
        "hold_ns": [w.hold_ns for w in wins], "overhead_ns": [w.overhead_ns for w in wins],
        "sync_ns": [sum(m.sync_ns for m in w.mounts) for w in wins],
    })


# ---- 4. timeout precision --------------------------------------------------------------------------

HUNG = b"#!/bin/sh\nsleep 60 &\nsleep 60\n"  # a hung script with a child
TIMEOUT_S = 0.2


@pytest.mark.benchmark(group="hung script gone after its deadline")
def test_timeout_pyexec(benchmark, tmp_path):
    path = make(tmp_path / "hung.sh", HUNG)
    late = []

    def once():
        with trust.open_trusted(path, trust.PRE) as f:
            t0 = time.monotonic()
            r = scripts.run_script(f, [], "pre", TIMEOUT_S, 0, True)
            late.append(int((time.monotonic() - t0 - TIMEOUT_S) * 1e9))
        assert r.timed_out

    benchmark.pedantic(once, rounds=10)
    benchmark.extra_info["late_ns"] = late


@pytest.mark.benchmark(group="hung script gone after its deadline")
@pytest.mark.parametrize("poll", [1.0, 3.0], ids=["poll1s", "poll3s"])
def test_timeout_polling_baseline(benchmark, tmp_path, poll):
    path = make(tmp_path / "hung.sh", HUNG)
    late = []

    def once():
        t0 = time.monotonic()
        rc, gone = PollingHost(poll).run_script(path, TIMEOUT_S)
        late.append(int((gone - t0 - TIMEOUT_S) * 1e9))
        assert rc is None

    benchmark.pedantic(once, rounds=3)
    benchmark.extra_info["late_ns"] = late


# ---- 6. scale: plugins in parallel -----------------------------------------------------------------

@pytest.mark.benchmark(group="pre-scripts of N plugins in parallel")
@pytest.mark.parametrize("n", [1, 8, 32])
def test_scale_plugins(benchmark, tmp_path, n):
    hc = write_setup(tmp_path, pre=NOOP, post=NOOP, plugins=n)
    checked = host.check(hc)
    try:
        assert not checked.errors
        benchmark.pedantic(lambda: host.run_phase(checked, "pre"), rounds=15, warmup_rounds=1)
    finally:
        checked.close()
    benchmark.extra_info["plugins"] = n


# ---- 7. how a script is started: through the checked fd, or by its path after a re-check -----------

@pytest.mark.benchmark(group="no-op #! script: start and wait")
@pytest.mark.parametrize("how", ["checked_fd", "path_rechecked"])
def test_script_start(benchmark, tmp_path, how):
    """Before: exec /proc/self/fd/3 (the checked fd; $0 was that /proc path).  Now: trust.recheck walks
    the configured path again, then exec by path ($0 is the path).  Same spawn, same wait."""
    nat = native.default()
    with trust.open_trusted(make(tmp_path / "etc" / "scripts" / "pre.sh", NOOP), trust.PRE) as f:
        def start():
            if how == "checked_fd":
                p = nat.spawn([f.path], {}, exec_fd=f.fd)
            else:
                trust.recheck(f)
                p = nat.spawn([f.path], {}, path=f.path)
            st = nat.wait(p, -1)
            p.close()
            assert st.code == 0

        benchmark.pedantic(start, rounds=200, warmup_rounds=5)


@pytest.mark.benchmark(group="re-check of a script's path")
def test_script_recheck(benchmark, tmp_path):
    with trust.open_trusted(make(tmp_path / "etc" / "scripts" / "pre.sh", NOOP), trust.PRE) as f:
        benchmark.extra_info["components"] = f.path.count("/")
        benchmark.pedantic(trust.recheck, args=(f,), rounds=2000, warmup_rounds=20)
