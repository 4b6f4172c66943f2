"""pyexec.run_async and pyexec.freeze_async: the event loop never blocks, and a cancellation behaves
like SIGINT on the command line (tree killed, window thawed, post-scripts run, then CancelledError)."""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest
from helpers import needs_root, procs_matching
from test_config_trust import write_setup
from test_freeze_window import writable_within

import pyexec
from pyexec.demo import loopfs

pytestmark = needs_root


def logged_setup(tmp_path, plugins=1, tag="x"):
    log = tmp_path / "log"
    pre = f"#!/bin/sh\necho pre >> {log}\nsh -c 'sleep 0.05; : {tag}'\n".encode()
    post = f"#!/bin/sh\nsh -c 'sleep 0.02; : {tag}'\necho post >> {log}\n".encode()
    return write_setup(tmp_path, pre=pre, post=post, plugins=plugins), log


def test_loop_stays_responsive_during_a_run(tmp_path, mounts):
    """A 1 ms timer on the same loop keeps ticking while 8 plugins' pre-scripts run and while a
    filesystem is frozen under a 200 ms snapshot coroutine: counted, not timed (how late each tick
    is depends on the machine's load; benchmarks/test_bench_async.py measures it)."""
    m = mounts.make("ext4")
    hc, log = logged_setup(tmp_path, plugins=8)
    ticks: list[float] = []
    snap: list[float] = []

    async def snapshot(win):
        assert [x.state for x in win.mounts] == ["frozen"]
        snap.append(time.monotonic())
        await asyncio.sleep(0.2)
        snap.append(time.monotonic())

    async def ticker(stop):
        while not stop.is_set():
            await asyncio.sleep(0.001)
            ticks.append(time.monotonic())

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0.05)
        start = time.monotonic()
        rep = await pyexec.run_async(hc, mount_points=[m.mountpoint], snapshot=snapshot, freeze_timeout=10)
        stop.set()
        await tick
        return rep, start

    rep, start = asyncio.run(main())
    assert rep.outcome == "app-consistent" and rep.snapshot == "taken"
    assert log.read_text().split().count("post") == 8
    # A loop blocked in a phase would tick zero times in it: the pre-scripts (each sleeps 50 ms)
    # and the window both leave it free.
    before_window = [t for t in ticks if start <= t < snap[0]]
    in_window = [t for t in ticks if snap[0] <= t <= snap[1]]
    assert len(before_window) >= 3, f"{len(before_window)} ticks during check, lock and pre-scripts"
    assert len(in_window) >= 3, f"{len(in_window)} ticks inside the window"


def test_cancellation_at_random_instants_resumes_and_thaws(tmp_path, mounts):
    m = mounts.make("ext4")
    w = mounts.writer(os.path.join(m.mountpoint, "w"))
    tag = f"acancel-{os.getpid()}-{time.monotonic_ns()}"
    hc, log = logged_setup(tmp_path, plugins=2, tag=tag)

    async def snapshot(win):
        await asyncio.sleep(0.2)

    async def one(delay):
        task = asyncio.create_task(pyexec.run_async(hc, mount_points=[m.mountpoint], snapshot=snapshot,
                                                    freeze_timeout=10))
        await asyncio.sleep(delay)
        task.cancel()
        try:
            rep = await task
            return rep.outcome
        except asyncio.CancelledError:
            return "cancelled"

    rng = random.Random(11)
    t0 = time.monotonic()  # an undisturbed run sets the range of instants
    asyncio.run(pyexec.run_async(hc, mount_points=[m.mountpoint], snapshot=snapshot, freeze_timeout=10))
    span = time.monotonic() - t0
    outcomes = []
    for _ in range(50):
        mounts.rearm()
        log.write_text("")
        outcomes.append(asyncio.run(one(rng.uniform(0, span))))
        ran = log.read_text().split()
        assert ran.count("pre") <= ran.count("post") <= 2, ran  # every started pre-script's post-script ran
        assert writable_within(w, 2) is not None, "a cancelled run left the mount frozen"
        assert not procs_matching(lambda a: any(tag.encode() in x for x in a)), "a script outlived its run"
    assert outcomes.count("cancelled") >= 25, outcomes
    assert not loopfs.thaw_path(m.mountpoint)


def test_freeze_async_thaws_on_cancellation(mounts):
    m = mounts.make("ext4")
    w = mounts.writer(os.path.join(m.mountpoint, "w"))
    held = {}
    entered = asyncio.Event()

    async def body():
        async with pyexec.freeze_async([m.mountpoint], timeout=10) as win:
            held["win"] = win
            entered.set()
            await asyncio.sleep(30)

    async def main():
        task = asyncio.create_task(body())
        await entered.wait()
        c0 = w.count()
        await asyncio.sleep(0.1)
        assert w.count() - c0 <= 1, "not frozen"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert writable_within(w, 2) is not None
    assert held["win"].mounts[0].state == "thawed"
