"""Run one pre- or post-script, or the snapshot command: the checked file by its configured path, a
documented environment, retries inside one deadline, the whole tree killed at the deadline or when the
run is cancelled, output captured bounded in memory."""
from __future__ import annotations

import os
import pwd
import shlex
import shutil
from collections.abc import Callable, Iterable, Mapping, Sequence

from pyexec import native, trust
from pyexec.cgroups import script_cgroup
from pyexec.errors import PyexecError
from pyexec.steps import CODES, OK_STATUS, ScriptResult
from pyexec.trust import TrustedFile

# systemd's PATH for services (systemd.exec(5), "Environment Variables in Spawned Processes"),
# for a caller that has none.
DEFAULT_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"
KILL_GRACE_NS = native.ns_from_s(1)  # TERM → KILL
CommandArg = str | bytes | os.PathLike[str] | os.PathLike[bytes]  # an element of a snapshot argv


def base_env() -> dict[str, str]:
    """What every script gets from the caller: its PATH (systemd's default if it has none), the user's
    HOME, USER, LOGNAME and SHELL from the password database, and its LANG, LC_* and TZ."""
    env = {"PATH": os.environ.get("PATH") or DEFAULT_PATH}
    try:
        pw = pwd.getpwuid(os.geteuid())
    except KeyError:  # a uid without a passwd entry
        env.update(HOME="/", SHELL="/bin/sh")
    else:
        env.update(HOME=pw.pw_dir or "/", USER=pw.pw_name, LOGNAME=pw.pw_name, SHELL=pw.pw_shell or "/bin/sh")
    env.update({k: v for k, v in os.environ.items() if k in ("LANG", "TZ") or k.startswith("LC_")})
    return env


def _runs_directly(script: TrustedFile) -> bool:
    # The reference runs every script as `sh PATH`.  execve runs only a `#!` script or a binary,
    # so anything else (no execute bit, no `#!` line, an empty file) runs as `/bin/sh PATH`.
    head = os.pread(script.fd, 4, 0)
    return script.executable and (head.startswith(b"#!") or head == b"\x7fELF")


def _attempt(nat: native.Native, argv: Sequence[str], path: str, exec_fd: int, env: Mapping[str, str],
             deadline: int, cancel_fd: int, use_cgroup: bool, on_stop: Callable[[], None] | None = None,
             ) -> tuple[native.Status | None, native.Captured, native.Captured, bool, bool]:
    """Spawn once and wait: (status or None, out, err, timed_out, cancelled); OSError if it cannot
    start.  On the deadline or a cancel, on_stop() runs first (the snapshot's window thaws), then
    the whole tree is killed and reaped."""
    out, err = nat.new_capture(), nat.new_capture()
    timed_out = cancelled = False
    with script_cgroup(use_cgroup) as cgfd:
        # Without a cgroup there is no warden: the kernel kills the script if we die.
        proc = nat.spawn(argv, env, path=path, exec_fd=exec_fd,
                         cgroup_fd=cgfd if cgfd >= 0 else native.SPAWN_DIE_WITH_PARENT)
        try:
            try:
                st = nat.wait(proc, deadline, out, err, cancel_fd=cancel_fd)
                timed_out = st is None
            except native.Cancelled:
                st, cancelled = None, True
            if st is None:
                if on_stop is not None:
                    on_stop()
                st = nat.kill_tree(proc, KILL_GRACE_NS, nat.kill_wait_ns, out, err, cgroup_fd=cgfd)
        finally:
            proc.close()
    return st, native.read_capture(out), native.read_capture(err), timed_out, cancelled


def run_script(script: TrustedFile, params: Sequence[str], phase: str, timeout_s: float, retries: int,
               continue_on_failure: bool, plugin: str = "", env_extra: Mapping[str, str] | None = None,
               nat: native.Native | None = None, use_cgroup: bool = True, cancel_fd: int = -1,
               host_limit: bool = False, base: Mapping[str, str] | None = None) -> ScriptResult:
    """Run script (already checked and open) until it succeeds, its tries run out, the deadline
    passes or cancel_fd becomes readable (the run was interrupted: its tree is killed).

    `$0` is the configured path; each try first re-checks that the path still names the checked file
    (trust.recheck).  host_limit: timeout_s is the host config's limit (a timeout is then 310/311)."""
    nat = nat or native.default()
    # base: base_env() computed once for a whole phase (its plugins start together).
    env = {**(base if base is not None else base_env()), "PYEXEC_PHASE": phase, **(env_extra or {})}
    res = ScriptResult(plugin, phase, script.path)
    t0 = nat.now_ns()
    deadline = t0 + native.ns_from_s(timeout_s)
    # By path, not through the checked fd: an interpreter given /proc/self/fd/N sees that as $0, and
    # `. "$(dirname "$0")/common.sh"` then looks in /proc.
    if _runs_directly(script):
        argv, path = [script.path, *params], script.path
    else:
        argv, path = ["sh", script.path, *params], "/bin/sh"
    for attempt in range(retries + 1):
        res.tries = attempt + 1
        try:
            trust.recheck(script)
        except PyexecError as e:  # replaced or made untrustworthy since the check: not run
            res.exit_code, res.error_code, res.detail = None, e.code, e.detail
            break
        try:
            st, res.stdout, res.stderr, res.timed_out, res.cancelled = _attempt(
                nat, argv, path, -1, env, deadline, cancel_fd, use_cgroup)
        except OSError as e:
            res.exit_code, res.detail = None, f"cannot execute: {e.strerror}"
            res.error_code = CODES[phase]["failed"]
            continue
        res.exit_code = st.code if st else None
        res.signal = st.signal if st else 0
        if res.cancelled or res.timed_out:
            res.stopped("cancelled" if res.cancelled else "timeout", timeout_s, host_limit,
                        "its process tree was killed", count_tries=True)
            break
        if res.exit_code == OK_STATUS:
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


SHELL_OPERATORS = {"&&", "||", ";", "|", ">", ">>", "<", "&", "2>&1"}


def shell_operators(argv: Sequence[str]) -> list[str]:
    """The shell operators among a resolved command's arguments: they reach the program as words,
    since no shell runs the command (a caller that meant a shell command line is told so)."""
    return sorted(SHELL_OPERATORS & set(argv[1:]))


def resolve_command(command: str | bytes | Iterable[CommandArg]) -> list[str]:
    """A snapshot command (a string split with shell rules, or an argv list) as an argv whose first
    element is an absolute path to an executable file; ValueError saying what is wrong.

    A bare name is looked up on the caller's PATH; a relative path is taken from the caller's
    working directory (the command itself runs in `/`).  The program found must pass the trust
    rules (trust.SNAPSHOT: root's, in directories only root can write, as a script)."""
    if isinstance(command, bytes):
        command = os.fsdecode(command)
    if isinstance(command, str):
        try:
            argv = shlex.split(command)
        except ValueError as e:
            raise ValueError(f"snapshot command {command!r}: {e}") from None
    else:
        argv = [os.fsdecode(a) for a in command]
    if not argv or not argv[0].strip():
        raise ValueError(f"snapshot command {command!r} is empty")
    prog = argv[0]
    if "/" not in prog:
        found = shutil.which(prog, path=os.environ.get("PATH", os.defpath))
        if found is None:
            raise ValueError(f"snapshot command {prog!r}: not found on PATH")
        prog = found
    prog = os.path.abspath(prog)
    if not os.path.exists(prog):
        raise ValueError(f"snapshot command {prog!r}: no such file")
    if not os.path.isfile(prog):
        raise ValueError(f"snapshot command {prog!r}: not a regular file")
    if not os.access(prog, os.X_OK):
        raise ValueError(f"snapshot command {prog!r}: not executable")
    try:
        # Root runs it: a program another user can replace (a PATH entry of theirs, a writable
        # directory above it) is theirs to run as root.  run_command walks it again before the spawn.
        trust.open_trusted(prog, trust.SNAPSHOT).close()
    except PyexecError as e:
        raise ValueError(f"snapshot command {prog!r} refused: {e.detail}") from None
    return [prog, *argv[1:]]


def run_command(argv: list[str], deadline_ns: int, cancel_fd: int = -1, on_stop: Callable[[], None] | None = None,
                nat: native.Native | None = None, env_extra: Mapping[str, str] | None = None) -> ScriptResult:
    """Run the snapshot command (an argv from resolve_command) as a script is run: its own cgroup,
    bounded output, its tree killed at deadline_ns or on cancel (after on_stop(): the thaw)."""
    nat = nat or native.default()
    res = ScriptResult("", "snapshot", argv[0], tries=1)
    t0 = nat.now_ns()
    try:
        # As a script's recheck: executed by path, right after a walk that proves only root could
        # change what the path names (the command was checked when it was resolved, before the run).
        trust.open_trusted(argv[0], trust.SNAPSHOT).close()
    except PyexecError as e:
        res.detail, res.error_code = f"not run: {e.detail}", -1
        return res
    try:
        st, res.stdout, res.stderr, res.timed_out, res.cancelled = _attempt(
            nat, argv, argv[0], -1, {**base_env(), **(env_extra or {}), "PYEXEC_PHASE": "snapshot"}, deadline_ns,
            cancel_fd, True, on_stop)
    except OSError as e:
        res.detail = f"cannot execute {argv[0]}: {e.strerror}"
        res.error_code = -1
        return res
    res.duration_ns = nat.now_ns() - t0
    res.exit_code = st.code if st else None
    res.signal = st.signal if st else 0
    if res.cancelled:
        res.detail = "interrupted: pyexec was signalled; the command's process tree was killed"
    elif res.timed_out:
        res.detail = "still running at the freeze bound; its process tree was killed"
    elif res.signal:
        res.detail = f"killed by signal {res.signal}"
    elif res.exit_code != 0:
        res.detail = f"exited with status {res.exit_code}"
    res.error_code = -1 if res.detail else 0
    return res
