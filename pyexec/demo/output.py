"""What the demos print and write: progress on stderr, private files in the sandbox, the JSON report
(in the sandbox, at --report PATH, on stdout with --json) and the last line saying where it went."""
from __future__ import annotations

import contextlib
import os
import sys
from typing import IO, Any

import orjson

from pyexec.demo import safeio

REPORT = "demo-report.json"  # the report's name in the sandbox


def say(msg: str) -> None:
    """Progress: stderr, so that stdout holds only the results (with --json, the report alone)."""
    print(f"demo: {msg}", file=sys.stderr, flush=True)


def write_file(path: str, data: str, mode: int) -> str:
    """Write data to path with mode (a file of the sandbox's own); path."""
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, mode)
    with os.fdopen(fd, "w") as f:
        f.write(data)
    os.chmod(path, mode)
    return path


def write_report(path: str, doc: dict[str, Any]) -> None:
    """The report doc as indented JSON at path, mode 600."""
    # Never through a symlink or a hard link at path (--report may name a shared directory).
    safeio.write_private(path, orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")


def write_sandbox_report(sandbox: str, doc: dict[str, Any], keep: bool) -> list[str]:
    """The report's copy in the sandbox, gone with it unless keep: [its path] if it stays, else []."""
    path = os.path.join(sandbox, REPORT)
    with contextlib.suppress(OSError):
        write_report(path, doc)
        return [path] if keep else []
    return []


def emit(json: bool, doc: dict[str, Any]) -> None:
    """With --json (json true), the report: the one document on stdout."""
    if json:
        sys.stdout.buffer.write(orjson.dumps(doc, option=orjson.OPT_INDENT_2) + b"\n")
        sys.stdout.flush()


def last_line(out: IO[str], result: str, where: list[str]) -> None:
    """The demo's verdict and where its full report is."""
    print(f"demo: {result}; " + (f"full report in {' and '.join(where)}" if where else
                                 "--report PATH (or --json) keeps the full report"), file=out)
