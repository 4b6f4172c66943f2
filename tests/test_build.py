"""The native core builds for the glibc the users have (RHEL 8: 2.28): compiled as it is there, it
needs no function glibc added later, and it compiles without a warning."""
from __future__ import annotations

import pathlib
import shutil
import subprocess

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent
SOURCES = ["freeze.c", "spawn.c", "wait.c", "kill.c", "probe.c", "guardian.c", "warden.c"]
# Functions glibc added after 2.28 that a spawn/close/pidfd core is tempted to call
# (glibc NEWS: 2.29 addchdir_np; 2.34 closefrom, close_range, addclosefrom_np; 2.36 pidfd_*).
AFTER_2_28 = {"posix_spawn_file_actions_addchdir_np", "posix_spawn_file_actions_addclosefrom_np", "closefrom",
              "close_range", "pidfd_open", "pidfd_send_signal", "pidfd_getfd", "clone3",
              "posix_spawnattr_setcgroup_np"}


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None, reason="needs gcc and nm")
def test_core_needs_no_glibc_newer_than_2_28(tmp_path):
    used = set()
    for src in SOURCES:
        obj = tmp_path / (src + ".o")
        subprocess.run(["gcc", "-std=gnu11", "-O2", "-Wall", "-Wextra", "-Werror", "-DPX_GLIBC_BEFORE_2_34",
                        "-I", str(ROOT / "native"), "-c", str(ROOT / "native" / src), "-o", str(obj)], check=True)
        out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
        used |= {line.split()[-1].split("@")[0] for line in out.splitlines() if line.strip()}
    assert "clone" in used and "syscall" in used, "the fallback spawn path was not compiled in"
    assert not used & AFTER_2_28, sorted(used & AFTER_2_28)


@pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("nm") is None, reason="needs gcc and nm")
def test_the_check_sees_a_newer_symbol(tmp_path):
    """Built for this machine's glibc (2.34 or newer), spawn.c does use posix_spawn's closefrom: the
    check above would notice it."""
    obj = tmp_path / "spawn.o"
    subprocess.run(["gcc", "-std=gnu11", "-O2", "-I", str(ROOT / "native"), "-c", str(ROOT / "native" / "spawn.c"),
                    "-o", str(obj)], check=True)
    out = subprocess.run(["nm", "-u", str(obj)], capture_output=True, text=True, check=True).stdout
    glibc = subprocess.run(["ldd", "--version"], capture_output=True, text=True).stdout.split("\n")[0]
    if "posix_spawn_file_actions_addclosefrom_np" not in out:
        pytest.skip(f"this machine's glibc predates 2.34 ({glibc})")
