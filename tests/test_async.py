"""pyexec.run_async and pyexec.freeze_async: the event loop never blocks, and a cancellation behaves
like SIGINT on the command line (tree killed, window thawed, post-scripts run, then CancelledError)."""
from __future__ import annotations

import asyncio
import os
import random
import time

import pytest

import pyexec
from helpers import needs_root, procs_matching
from pyexec.demo import loopfs
from test_config_trust import write_setup
from test_freeze_window import writable_within

pytestmark = needs_root


def logged_setup(tmp_path, plugins=1, tag="x"):
    log = tmp_path / "log"
    pre = f"#!/bin/sh\necho pre >> {log}\nsh -c 'sleep 0.05; : {tag}'\n".encode()
    post = f"#!/bin/sh\nsh -c 'sleep 0.02; : {tag}'\necho post >> {log}\n".encode()
    return write_setup(tmp_path, pre=pre, post=post, plugins=plugins), log


def test_loop_stays_responsive_during_a_run(tmp_path, mounts):
    """A 1 ms timer on the same loop stays punctual while 8 plugins run, a filesystem freezes and a
    200 ms snapshot coroutine holds the window."""
    m = mounts.make("ext4")
    hc, log = logged_setup(tmp_path, plugins=8)
    late: list[float] = []

    async def snapshot(win):
        assert [x.state for x in win.mounts] == ["frozen"]
        await asyncio.sleep(0.2)

    async def ticker(stop):
        while not stop.is_set():
            t = time.perf_counter()
            await asyncio.sleep(0.001)
            late.append(time.perf_counter() - t - 0.001)

    async def main():
        stop = asyncio.Event()
        tick = asyncio.create_task(ticker(stop))
        await asyncio.sleep(0.05)
        rep = await pyexec.run_async(hc, mount_points=[m.mountpoint], snapshot=snapshot, freeze_timeout=10)
        stop.set()
        await tick
        return rep

    rep = asyncio.run(main())
    assert rep.outcome == "app-consistent" and rep.snapshot == "taken"
    assert log.read_text().split().count("post") == 8
    assert len(late) > 100
    print(f"timer lateness over {len(late)} ticks: median {sorted(late)[len(late) // 2] * 1e3:.3f} ms, "
          f"max {max(late) * 1e3:.3f} ms")
    assert max(late) < 0.005, f"the loop was blocked {max(late) * 1e3:.1f} ms"


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

    async def body():
        async with pyexec.freeze_async([m.mountpoint], timeout=10) as win:
            held["win"] = win
            await asyncio.sleep(30)

    async def main():
        task = asyncio.create_task(body())
        while "win" not in held:
            await asyncio.sleep(0.001)
        c0 = w.count()
        await asyncio.sleep(0.1)
        assert w.count() - c0 <= 1, "not frozen"
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(main())
    assert writable_within(w, 2) is not None
    assert held["win"].mounts[0].state == "thawed"
