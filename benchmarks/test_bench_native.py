"""Native core speed, as ratios within one run: spawn+wait against the standard library,
and FIFREEZE+FITHAW of one idle ext4 loop mount, plain and expedited."""
from __future__ import annotations

import os
import subprocess

import pytest

from pyexec import native

TRUE = "/bin/true"


def _native_true(nat):
    p = nat.spawn([TRUE], {}, path=TRUE)
    st = nat.wait(p, -1, None, None)
    p.close()
    assert st.code == 0


@pytest.mark.benchmark(group="spawn+wait /bin/true")
def test_spawn_native(benchmark, nat):
    benchmark(_native_true, nat)


@pytest.mark.benchmark(group="spawn+wait /bin/true")
def test_spawn_subprocess_run(benchmark):
    benchmark(lambda: subprocess.run([TRUE], check=True))


@pytest.mark.benchmark(group="spawn+wait /bin/true")
def test_spawn_os_posix_spawn(benchmark):
    def run():
        pid = os.posix_spawn(TRUE, [TRUE], {})
        assert os.waitpid(pid, 0)[1] == 0
    benchmark(run)


@pytest.mark.benchmark(group="FIFREEZE+FITHAW idle ext4")
@pytest.mark.parametrize("flags", [0, native.FREEZE_EXPEDITE], ids=["plain", "expedited"])
def test_freeze_thaw_ext4(benchmark, nat, mounts, flags):
    m = mounts.make("ext4")
    fd = os.open(m.mountpoint, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    buf = nat.new_set()
    nat.set_init(buf, [fd])

    def cycle():
        assert nat.freeze(buf, flags) == 0
        assert nat.thaw(buf) == 0

    try:
        benchmark(cycle)
    finally:
        os.close(fd)
