"""`mypy --strict` on the package (the configuration is pyproject.toml's [tool.mypy]): the public API
and everything under it type-checks, the two bindings against native.Binding included."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_mypy_strict_is_clean(tmp_path):
    pytest.importorskip("mypy", reason="mypy is not installed (requirements-dev.txt has it)")
    # A fresh cache: a stale one can hide an error in a stub edited within the same second.
    r = subprocess.run([sys.executable, "-m", "mypy", "--strict", "--cache-dir", str(tmp_path / "cache"), "pyexec"],
                       capture_output=True, text=True, cwd=ROOT, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert r.stdout.startswith("Success: no issues found"), r.stdout
