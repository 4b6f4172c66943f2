"""One step of a phase, a script's or a built-in quiescer's (and the snapshot command): how it
ended, its table code, and the words for a step pyexec stopped, written once for both kinds."""
from __future__ import annotations

import dataclasses
from typing import TypedDict

from pyexec import native
from pyexec.errors import TABLE

# Only 0 is success.  The reference's ScriptRunner keeps exit status 2 (PrePost_ScriptStatus_Warning)
# as the plugin's errorCode, which its PluginHost counts as a failed script (anyScriptFailed).
OK_STATUS = 0
# "host_timeout": the host config's timeoutInSeconds was the limit that expired (the reference's
# PluginHost reports FailedPrepostPluginhostPreTimeout/PostTimeout for a plugin still running then).
CODES = {"pre": {"failed": 300, "timeout": 308, "host_timeout": 310},
         "post": {"failed": 301, "timeout": 309, "host_timeout": 311}}


class OutputDict(TypedDict):
    """Captured output as report fields."""

    text: str  # head and tail, undecodable bytes escaped
    total: int
    dropped: int


class ScriptDict(TypedDict):
    """A ScriptResult as report fields."""

    plugin: str
    phase: str
    path: str
    tries: int
    exit_code: int | None
    signal: int
    timed_out: bool
    duration_ns: int
    stdout: OutputDict | None
    stderr: OutputDict | None
    error_code: int
    error: str | None
    continue_backup: bool
    detail: str
    cancelled: bool
    facts: dict[str, str]


@dataclasses.dataclass
class ScriptResult:
    """How one step ran (a script, a quiescer's phase, the snapshot command): tries, status, duration,
    output and its table code."""

    plugin: str
    phase: str
    path: str
    tries: int = 0
    exit_code: int | None = None
    signal: int = 0
    timed_out: bool = False
    duration_ns: int = 0
    stdout: native.Captured | None = None
    stderr: native.Captured | None = None
    error_code: int = 0  # a table code; -1: the snapshot command failed (it has no code of its own)
    continue_backup: bool = True
    detail: str = ""
    cancelled: bool = False
    # What a built-in quiescer recorded: binlog position, GTID, LSNs, the backup_label's path.
    facts: dict[str, str] = dataclasses.field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.error_code == 0

    def as_dict(self) -> ScriptDict:
        """The result as report fields (output as text, undecodable bytes escaped)."""
        def text(c: native.Captured | None) -> OutputDict | None:
            if c is None:
                return None
            return {"text": c.data.decode("utf-8", "backslashreplace"), "total": c.total, "dropped": c.dropped}
        return {
            "plugin": self.plugin, "phase": self.phase, "path": self.path, "tries": self.tries,
            "exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
            "duration_ns": self.duration_ns, "stdout": text(self.stdout), "stderr": text(self.stderr),
            "error_code": self.error_code, "error": TABLE[self.error_code].name if self.error_code > 0 else None,
            "continue_backup": self.continue_backup, "detail": self.detail, "cancelled": self.cancelled,
            "facts": dict(self.facts),
        }

    def stopped(self, cause: str, timeout_s: float, host_limit: bool, outcome: str, count_tries: bool = False) -> None:
        """Record that pyexec ended the step: cause "cancelled" (a signal) or "timeout" (timeout_s,
        the host config's limit if host_limit: 310/311, else the plugin's: 308/309), and what became of
        it (outcome: "its process tree was killed", ...); count_tries: name the try it ended."""
        codes = CODES[self.phase]
        if cause == "cancelled":
            self.cancelled = True
            self.error_code = codes["failed"]
            at = f" (try {self.tries})" if count_tries else ""
            self.detail = f"interrupted{at}: pyexec was signalled; {outcome}"
        else:
            self.timed_out = True
            self.error_code = codes["host_timeout" if host_limit else "timeout"]
            limit = "the plugin host's timeoutInSeconds" if host_limit else "timeoutInSeconds"
            at = f", try {self.tries}" if count_tries else ""
            self.detail = f"timed out after {timeout_s:g}s ({limit}{at}); {outcome}"
