"""The suite under each kernel profile (tests/kernel_profile.py): a seccomp filter answers pyexec's
syscalls as RHEL 8 (4.18), Ubuntu 20.04 (5.4) or 5.7 would, and cgroup v2 (or every cgroup) is hidden.  Each profile's
probe must report its fallbacks, and the spawn, scripts, freeze, host, safefreeze, promise and kill-storm
tests must pass on them (with both bindings where a test takes `nat`).  Counts go to
results/kernel-profiles.json."""
from __future__ import annotations

import os
import pathlib
import re
import subprocess
import sys

import orjson
import pytest

from helpers import needs_root
import kernel_profile

pytestmark = needs_root

HERE = pathlib.Path(__file__).resolve().parent
MODULES = ["test_native_spawn.py", "test_freeze_window.py", "test_host.py", "test_safefreeze.py",
           "test_promises.py", "test_kill_storm.py"]
REPORT = HERE.parent / "results" / "kernel-profiles.json"


def under(profile: str, *argv: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(HERE / "kernel_profile.py"), profile, "--", *argv],
                          capture_output=True, text=True, cwd="/", **kw)


@pytest.mark.parametrize("profile", ["4.18", "4.18-v1", "5.4", "5.7", "v1", "nocgroup"])
def test_suite_under_kernel_profile(profile):
    probe = under(profile, sys.executable, "-c",
                  "import orjson; from pyexec import native, scripts\n"
                  "print(orjson.dumps({n: native.load(n).features() for n in ('cython', 'cffi')}).decode())\n"
                  "print(orjson.dumps(scripts.kernel_paths()).decode())", timeout=60)
    assert probe.returncode == 0, probe.stderr
    feats, paths = map(orjson.loads, probe.stdout.splitlines())
    want = kernel_profile.EXPECTED[profile]
    if want is not None:
        assert feats["cython"] == want == feats["cffi"]
    # openat2 came in 5.6: before it, mount points are opened by the O_NOFOLLOW walk.
    assert paths["mount open"].startswith("O_NOFOLLOW walk" if profile in ("4.18", "4.18-v1", "5.4") else "openat2")
    env = {**os.environ, "PYEXEC_KILL_TRIALS": "35"}
    run = under(profile, sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", "--timeout", "300",
                "--benchmark-disable", "--rootdir", str(HERE.parent), "-c", str(HERE.parent / "pyproject.toml"),
                *[str(HERE / m) for m in MODULES], env=env, timeout=1200)
    tail = run.stdout.strip().splitlines()[-1] if run.stdout.strip() else run.stderr[-2000:]
    assert run.returncode == 0, run.stdout[-6000:] + run.stderr[-2000:]
    counts = {k: int(v) for v, k in re.findall(r"(\d+) (passed|skipped|failed)", tail)}
    skipped = re.findall(r"SKIPPED \[\d+\] [^:]+:\d+: (.*)", run.stdout)
    REPORT.parent.mkdir(exist_ok=True)
    doc = orjson.loads(REPORT.read_bytes()) if REPORT.exists() else {}
    doc[profile] = {"features": feats["cython"], "paths": paths, "tests": counts, "skip_reasons": sorted(set(skipped))}
    REPORT.write_bytes(orjson.dumps(doc, option=orjson.OPT_INDENT_2))
