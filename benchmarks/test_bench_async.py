"""run_async against run: the same flow (no-op scripts, one ext4, no-op snapshot), the one through the
asyncio face.  The ratio of the medians is run_async's overhead (target: at most 10 %)."""
from __future__ import annotations

import asyncio

import pytest

import pyexec
from helpers import needs_root
from test_config_trust import write_setup

pytestmark = needs_root

NOOP = b"#!/bin/sh\nexit 0\n"


@pytest.fixture
def setup(tmp_path, mounts):
    m = mounts.make("ext4")
    return write_setup(tmp_path, pre=NOOP, post=NOOP), m.mountpoint


@pytest.mark.benchmark(group="run vs run_async, no-op scripts, 1 ext4")
def test_run_sync(benchmark, setup):
    hc, mp = setup
    rep = benchmark.pedantic(lambda: pyexec.run(hc, mount_points=[mp], freeze_timeout=30), rounds=40,
                             warmup_rounds=3)
    assert rep.outcome == "app-consistent"


@pytest.mark.benchmark(group="run vs run_async, no-op scripts, 1 ext4")
def test_run_async(benchmark, setup):
    hc, mp = setup
    loop = asyncio.new_event_loop()
    try:
        rep = benchmark.pedantic(
            lambda: loop.run_until_complete(pyexec.run_async(hc, mount_points=[mp], freeze_timeout=30)),
            rounds=40, warmup_rounds=3)
    finally:
        loop.close()
    assert rep.outcome == "app-consistent"
