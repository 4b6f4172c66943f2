"""The README's promises: the demo runs end to end and cleans up; the error table matches."""
from __future__ import annotations

import os
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
    """--json: stdout is the report alone (progress on stderr), also in --report PATH; the working
    directory and --dir are left empty."""
    cwd, sandbox = tmp_path / "cwd", tmp_path / "sandbox"
    cwd.mkdir()
    sandbox.mkdir()
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", "--rounds", "2", "--dir", str(sandbox), "--json",
                        "--report", str(tmp_path / "report.json")],
                       capture_output=True, text=True, cwd=cwd, timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    doc = orjson.loads(r.stdout)  # one JSON document and nothing else
    assert "demo: sandbox in" in r.stderr and "application-consistent snapshot verified" in r.stderr
    assert orjson.loads((tmp_path / "report.json").read_bytes()) == doc
    assert doc["ok"] and len(doc["rounds"]) == 2
    for rnd in doc["rounds"]:
        v = rnd["verification"]
        assert v["integrity_check"] == "ok" and v["db_matches_quiesce_point"] and v["log_last_record_whole"]
        assert rnd["report"]["outcome"] == "app-consistent"
    # Other tests (another session's included) may attach loop devices meanwhile: look for ours only.
    assert [d for d in loop_devices() if str(sandbox) in d] == []
    assert list(cwd.iterdir()) == [] and list(sandbox.iterdir()) == []
    assert str(sandbox) not in open("/proc/self/mountinfo").read()


@needs_root
@needs_xfs
@needs_btrfs
def test_demo_without_quiesce_says_file_system_consistent(tmp_path):
    """--no-quiesce configures no plugin: the run reports what it is, never app-consistent."""
    r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", "--rounds", "1", "--no-quiesce", "--json",
                        "--dir", str(tmp_path)], capture_output=True, text=True, cwd="/", timeout=600)
    assert r.returncode == 0, r.stdout + r.stderr
    rnd = orjson.loads(r.stdout)["rounds"][0]
    assert rnd["report"]["outcome"] == "file-system-consistent" and rnd["report"]["pre"] == []
    assert "file-system-consistent (nothing quiesced" in r.stderr and "application-consistent" not in r.stderr
    assert "db_matches_quiesce_point" not in rnd["verification"]


def test_demo_json_without_root_is_one_document():
    r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", sys.executable, "-m",
                        "pyexec.cli", "demo", "--json"], capture_output=True, text=True, cwd="/", timeout=60)
    assert r.returncode == 2, r.stdout + r.stderr
    assert orjson.loads(r.stdout) == {"rounds": [], "ok": False, "error": "needs root"}


def test_readme_error_table_matches_code():
    assert errors.markdown_table() in README.read_text(), "regenerate with: python -c " \
        "'from pyexec import errors; print(errors.markdown_table())'"


def test_readme_commands_are_the_ci_commands():
    """The fresh-machine section gives the two commands first, CI runs the second as its only command,
    and each sets the machine up first, then runs the demo or the whole suite."""
    section = README.read_text().split("## On a fresh machine", 1)[1].split("\n## ", 1)[0]
    commands = [line.strip() for line in section.splitlines() if line.startswith("    ") and line.strip()]
    assert commands[:2] == ["make demo", "make test"], commands
    ci = [line.strip() for line in (README.parent / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.lstrip().startswith("#")]
    assert ci[-1] == commands[1] and not any(c.startswith(("make", "pytest", ".venv")) for c in ci[:-1]), ci
    for target, last in (("test", "pytest -q --timeout 900 --benchmark-disable tests benchmarks"),
                         ("demo", "pyexec demo")):
        r = subprocess.run(["make", "-n", "-C", str(README.parent), target], capture_output=True, text=True,
                           timeout=60, env={**os.environ, "VENV": ".venv"})
        steps = [s for s in r.stdout.splitlines() if s.strip() and not s.startswith("make")]
        assert r.returncode == 0 and steps == ["bash scripts/setup.sh", f".venv/bin/{last}"], r.stdout


def test_demo_with_a_missing_dir_is_a_usage_error(tmp_path):
    """--dir that does not exist: 11 InvalidParameter naming it, exit 2, one JSON document with --json,
    no traceback and no sandbox made."""
    missing = tmp_path / "no" / "such"
    for extra in ([], ["--json"]):
        r = subprocess.run([sys.executable, "-m", "pyexec.cli", "demo", "--dir", str(missing), *extra],
                           capture_output=True, text=True, timeout=60)
        assert r.returncode == 2 and "Traceback" not in r.stderr, r.stderr
        assert "InvalidParameter" in r.stderr and str(missing) in r.stderr
        if extra:
            assert orjson.loads(r.stdout)["code"] == 11
    assert not (tmp_path / "no").exists()
