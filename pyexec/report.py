"""The JSON report of a run (orjson), and its short human summary."""
from __future__ import annotations

import os
from typing import TypedDict

import orjson

from pyexec import kernel, steps
from pyexec.errors import TABLE, ErrorDict
from pyexec.host import RunReport
from pyexec.window import WindowDict


class SnapshotDict(TypedDict):
    state: str  # taken | skipped | failed
    detail: str
    command: steps.ScriptDict | None


class ReportDict(TypedDict):
    """The JSON report of a run (`pyexec run --json`)."""

    outcome: str
    code: int
    error: str | None
    interrupted: str | None
    problems: list[ErrorDict]
    warnings: list[str]
    snapshot: SnapshotDict
    mounts: list[str]
    phases_ns: dict[str, int]
    pre: list[steps.ScriptDict]
    post: list[steps.ScriptDict]
    window: WindowDict | None
    pid: int
    kernel: dict[str, str]


def to_dict(rep: RunReport) -> ReportDict:
    """A RunReport as plain data."""
    return {
        "outcome": rep.outcome,
        "code": rep.code,
        "error": TABLE[rep.code].name if rep.code else None,
        "interrupted": rep.interrupted,
        "problems": [e.as_dict() for e in rep.check_errors],
        "warnings": rep.warnings,
        "snapshot": {"state": rep.snapshot, "detail": rep.snapshot_detail,
                     "command": rep.snapshot_run.as_dict() if rep.snapshot_run else None},
        "mounts": rep.mounts,
        "phases_ns": rep.phases_ns,
        "pre": [r.as_dict() for r in rep.pre],
        "post": [r.as_dict() for r in rep.post],
        "window": rep.window.as_dict() if rep.window else None,
        "pid": os.getpid(),
        "kernel": kernel.kernel_paths(),
    }


def dumps(rep: RunReport) -> bytes:
    """The report as indented JSON."""
    return orjson.dumps(to_dict(rep), option=orjson.OPT_INDENT_2)


def summary(rep: RunReport) -> str:
    """A few lines for a person."""
    lines = [f"outcome: {rep.outcome}" + (f" (code {rep.code} {TABLE[rep.code].name})" if rep.code else "")
             + (f", interrupted by {rep.interrupted}" if rep.interrupted else "")]
    lines.append(f"  snapshot: {rep.snapshot}" + (f" ({rep.snapshot_detail})" if rep.snapshot_detail else ""))
    for name, ns in rep.phases_ns.items():
        lines.append(f"  {name:<16} {ns / 1e6:10.3f} ms")
    if rep.window:
        w = rep.window
        lines.append(f"  freeze window    {w.length_ns / 1e3:10.1f} µs  (ioctls {w.ioctl_ns / 1e3:.1f} µs, "
                     f"snapshot {w.hold_ns / 1e3:.1f} µs, pyexec {w.overhead_ns / 1e3:.1f} µs)")
    for warning in rep.warnings:
        lines.append(f"  warning: {warning}")
    for e in rep.check_errors:
        lines.append(f"  problem {e.describe()}")
    for r in rep.pre + rep.post:
        status = "ok" if r.ok else f"{r.error_code} {TABLE[r.error_code].name}: {r.detail}"
        lines.append(f"  {r.phase}-script {r.plugin}: {status} ({r.tries} tr{'y' if r.tries == 1 else 'ies'}, "
                     f"{r.duration_ns / 1e6:.2f} ms)")
        if r.facts:  # a built-in quiescer's record: binlog position, GTID, LSNs, backup_label
            lines.append("    " + ", ".join(f"{k}={v}" for k, v in r.facts.items()))
    return "\n".join(lines)
