"""Run one pre- or post-script: the checked fd, a clean environment, retries inside one
deadline, the whole tree killed at the deadline, output captured bounded in memory."""
from __future__ import annotations

import contextlib
import dataclasses
import itertools
import os

from pyexec import native
from pyexec.errors import TABLE
from pyexec.trust import TrustedFile

BASE_ENV = {"PATH": "/usr/sbin:/usr/bin:/sbin:/bin", "LANG": "C"}
KILL_GRACE_NS = 1_000_000_000  # TERM → KILL
KILL_WAIT_NS = 5_000_000_000
# The reference treats exit status 2 (PrePost_ScriptStatus_Warning) as success.
OK_STATUSES = (0, 2)
CODES = {"pre": {"failed": 300, "timeout": 308}, "post": {"failed": 301, "timeout": 309}}
_cg_seq = itertools.count()


@dataclasses.dataclass
class ScriptResult:
    """How one script ran: tries, status, duration, output and its table code."""

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
    error_code: int = 0
    continue_backup: bool = True
    detail: str = ""

    @property
    def ok(self) -> bool:
        return self.error_code == 0

    def as_dict(self) -> dict:
        """The result as report fields (output as text, undecodable bytes escaped)."""
        def text(c):
            if c is None:
                return None
            return {"text": c.data.decode("utf-8", "backslashreplace"), "total": c.total, "dropped": c.dropped}
        return {
            "plugin": self.plugin, "phase": self.phase, "path": self.path, "tries": self.tries,
            "exit_code": self.exit_code, "signal": self.signal, "timed_out": self.timed_out,
            "duration_ns": self.duration_ns, "stdout": text(self.stdout), "stderr": text(self.stderr),
            "error_code": self.error_code, "error": TABLE[self.error_code].name if self.error_code else None,
            "continue_backup": self.continue_backup, "detail": self.detail,
        }


def cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> str | None:
    """Where cgroup v2 is mounted, or None."""
    with contextlib.suppress(OSError), open(mountinfo) as f:
        for line in f:
            left, _, right = line.partition(" - ")
            if right.split()[:1] == ["cgroup2"]:
                return left.split()[4]
    return None


@contextlib.contextmanager
def script_cgroup(enabled: bool = True):
    """A fresh leaf cgroup (its fd) for one script, or -1 where cgroup v2 is unusable."""
    root = cgroup2_root() if enabled else None
    path = fd = None
    if root:
        try:
            parent = os.path.join(root, "pyexec")
            os.makedirs(parent, exist_ok=True)
            path = os.path.join(parent, f"{os.getpid()}-{next(_cg_seq)}")
            os.mkdir(path)
            fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            path = None  # fall back to process-group kills
    try:
        yield fd if fd is not None else -1
    finally:
        if fd is not None:
            os.close(fd)
        if path:
            with contextlib.suppress(OSError):
                os.rmdir(path)


def run_script(script: TrustedFile, params, phase: str, timeout_s: float, retries: int,
               continue_on_failure: bool, plugin: str = "", env_extra: dict | None = None,
               nat: native.Native | None = None, use_cgroup: bool = True) -> ScriptResult:
    """Run script (already checked and open) until it succeeds, its tries run out or the deadline."""
    nat = nat or native.default()
    env = {**BASE_ENV, "PYEXEC_PHASE": phase, **(env_extra or {})}
    res = ScriptResult(plugin, phase, script.path)
    t0 = nat.now_ns()
    deadline = t0 + int(timeout_s * 1e9)
    if script.executable:
        argv, path = [script.path, *params], None
    else:  # as the reference does for a script with no execute bit: through sh, from the same fd
        argv, path = ["sh", "/proc/self/fd/3", *params], "/bin/sh"
    for attempt in range(retries + 1):
        res.tries = attempt + 1
        out, err = nat.new_capture(), nat.new_capture()
        with script_cgroup(use_cgroup) as cgfd:
            try:
                proc = nat.spawn(argv, env, path=path, exec_fd=script.fd, cgroup_fd=cgfd)
            except OSError as e:
                res.exit_code, res.detail = None, f"cannot execute: {e.strerror}"
                res.error_code = CODES[phase]["failed"]
                continue
            try:
                st = nat.wait(proc, deadline, out, err)
                if st is None:
                    res.timed_out = True
                    st = nat.kill_tree(proc, KILL_GRACE_NS, KILL_WAIT_NS, out, err, cgroup_fd=cgfd)
            finally:
                proc.close()
        res.stdout, res.stderr = native.read_capture(out), native.read_capture(err)
        res.exit_code = st.code if st else None
        res.signal = st.signal if st else 0
        if res.timed_out:
            res.error_code = CODES[phase]["timeout"]
            res.detail = f"timed out after {timeout_s:g}s (try {res.tries}); its process tree was killed"
            break
        if res.exit_code in OK_STATUSES:
            res.error_code, res.detail = 0, ""
            break
        res.error_code = CODES[phase]["failed"]
        res.detail = (f"killed by signal {res.signal}" if res.signal else f"exited with status {res.exit_code}")
        if nat.now_ns() >= deadline:
            break
    res.duration_ns = nat.now_ns() - t0
    if res.error_code:
        res.continue_backup = continue_on_failure
    return res
