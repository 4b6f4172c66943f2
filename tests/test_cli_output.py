"""The command line's output contract: `--help` states each command and the exit statuses; a usage
error with --json is still one JSON document on stdout.  (`pyexec demo --json`: test_demo_and_readme.py.)"""
from __future__ import annotations

import subprocess
import sys

import orjson

from pyexec import errors


def pyexec(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "pyexec.cli", *args], capture_output=True, text=True, cwd="/",
                          timeout=60, env={"PATH": "/usr/bin:/bin", "COLUMNS": "100"})


def test_help_lists_each_command_and_the_exit_statuses():
    r = pyexec("--help")
    assert r.returncode == 0 and r.stderr == ""
    lines = r.stdout.splitlines()
    for cmd in ("check", "run", "status", "recover", "demo", "agent", "group"):
        assert any(line.split()[:1] == [cmd] and len(line.split()) > 3 for line in lines), f"no line for {cmd}"
    status = r.stdout[r.stdout.index("exit status:"):]
    # The run outcomes (0, 1, 2), the error table's statuses, a signal's.
    table = {str(e.exit_status) for e in errors.TABLE.values()}
    for code in {"0", "1", "2", "128+N"} | table:
        assert any(line.split()[:1] == [code] for line in status.splitlines()), f"exit status {code} not explained"


def test_usage_error_with_json_is_one_document():
    r = pyexec("run", "--config", "/nonexistent/host.conf", "--freeze-timeout", "nan", "--json")
    assert r.returncode == 2
    doc = orjson.loads(r.stdout)  # one document, nothing around it
    assert doc["code"] == 11 and doc["outcome"] == "failed"
