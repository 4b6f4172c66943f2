"""`ruff check` on everything Python in the repository (the configuration is pyproject.toml's [tool.ruff]):
the package, the tests, the benchmarks, the scripts and the native build stay free of its findings."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_ruff_check_is_clean():
    pytest.importorskip("ruff", reason="ruff is not installed (requirements-dev.txt has it)")
    # --no-cache: no .ruff_cache left in the checkout, and no stale result for a file edited within the second.
    r = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache",
                        "pyexec", "tests", "benchmarks", "scripts", "native", "setup.py"],
                       capture_output=True, text=True, cwd=ROOT, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
