"""The README's promises: the demo runs end to end and cleans up; the error table matches."""
from __future__ import annotations

import pathlib
import subprocess
import sys

import orjson

from helpers import needs_btrfs, needs_root, needs_xfs
from pyexec import errors

README = pathlib.Path(__file__).resolve().parent.parent / "README.md"


def loop_devices() -> list[str]:
    return subprocess.run(["losetup", "-a"], capture_output=True, text=True).stdout.splitlines()


@needs_root
@needs_xfs
@needs_btrfs
def test_demo_verifies_and_leaves_nothing_behind(tmp_path):
    before = loop_devices()
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", "--rounds", "2", "--dir", str(tmp_path)],
                       capture_output=True, text=True, cwd=tmp_path, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "application-consistent snapshot verified" in r.stdout
    doc = orjson.loads((tmp_path / "pyexec-demo-report.json").read_bytes())
    assert doc["ok"] and len(doc["rounds"]) == 2
    for rnd in doc["rounds"]:
        v = rnd["verification"]
        assert v["integrity_check"] == "ok" and v["db_matches_quiesce_point"] and v["log_last_record_whole"]
        assert rnd["report"]["outcome"] == "app-consistent"
    assert loop_devices() == before
    assert [p.name for p in tmp_path.iterdir()] == ["pyexec-demo-report.json"]
    assert str(tmp_path) not in open("/proc/self/mountinfo").read()


def test_readme_error_table_matches_code():
    assert errors.markdown_table() in README.read_text(), "regenerate with: python -c " \
        "'from pyexec import errors; print(errors.markdown_table())'"


def test_readme_commands_are_the_ci_commands():
    text = README.read_text()
    assert "make test" in text and "make demo" in text
    assert "make test" in (README.parent / ".ci" / "run").read_text()
