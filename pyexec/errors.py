"""The one error table of pyexec, its exception hierarchy, and the only errno mapping.

Codes and names follow the reference plugin host (Azure VMBackup `common.py`) and the
public troubleshooting table; messages and actions follow that table in substance.
Every other module raises or reports these entries: no other module defines a code.
"""
from __future__ import annotations

import dataclasses
import errno as _errno
import os
from typing import TypedDict

# How a problem affects the backup, as the reference's caller decides it.
FALLBACK = "fallback"  # the snapshot goes on, file-system consistent
FATAL = "fatal"        # no snapshot


@dataclasses.dataclass(frozen=True)
class Entry:
    """One row of the error table."""

    code: int
    name: str
    message: str
    action: str
    effect: str
    exit_status: int


def _e(code: int, name: str, message: str, action: str, effect: str = FALLBACK,
       exit_status: int | None = None) -> Entry:
    return Entry(code, name, message, action, effect, exit_status if exit_status is not None else 2)


_SCRIPT_ACTION = "Please look at the failure logs for your script to rectify the issue."
_PERM_ACTION = ("Make sure \"root\" user is the \"owner\" of the script file and only owner have "
                "\"read\", \"write\" and \"execute\" permissions (chmod 700), and that no parent "
                "directory is writable by anyone but root.")
_TIMEOUT_ACTION = ("Please check the script and increase the timeout (timeoutInSeconds) in the "
                   "VMSnapshotScriptPluginConfig.json file located at /etc/azure.")
_JSON_ACTION = ("Please fix the file (or download a fresh copy of VMSnapshotScriptPluginConfig.json "
                "from https://github.com/MicrosoftAzureBackup/VMSnapshotPluginConfig) and configure it again.")

TABLE: dict[int, Entry] = {e.code: e for e in [
    # The extension's own code for a bad parameter (ExtensionErrorCodeHelper: error_parameter = 11).
    _e(11, "InvalidParameter", "A command-line option or argument is invalid, so nothing was run.",
       "Fix the value the detail names: --freeze-timeout a number of seconds in (0, 86400]; --snapshot-cmd a "
       "command line (shell quoting) whose program exists and is executable (a bare name is looked up on PATH), "
       "owned by root, not writable by group or others, in directories only root can write.",
       effect=FATAL, exit_status=2),
    _e(121, "FsFreezeFailed", "The file systems could not be frozen, so the snapshot is only crash consistent.",
       "Check the per-mount errno in the report: a file system frozen by another tool (EBUSY) is left "
       "to its owner; one that does not support freezing must be skipped.", exit_status=3),
    _e(122, "FsFreezeTimeout", "The file systems stayed frozen until the freeze bound and were thawed by force.",
       "Make the snapshot action finish within the freeze timeout, or raise the timeout.", exit_status=3),
    _e(123, "UnableToOpenMount", "A mount point to freeze could not be opened.",
       "Check that every mount point named (or discovered) exists and is a directory; skip it otherwise.",
       exit_status=3),
    _e(300, "Pre-ScriptExecutionFailed",
       "Pre-Script returned an error so backup may not be application consistent.", _SCRIPT_ACTION),
    _e(301, "Post-ScriptExecutionFailed",
       "Post-Script returned an error which might impact application state.",
       _SCRIPT_ACTION + " Check the application state."),
    _e(302, "Pre-ScriptNotFound",
       "Pre-Script was not found at the location specified in the VMSnapshotScriptPluginConfig.json config file.",
       "Please make sure that Pre-Script is present at the path specified in the config file to ensure "
       "application consistent backup."),
    _e(303, "Post-ScriptNotFound",
       "Post-Script was not found at the location specified in the VMSnapshotScriptPluginConfig.json config file.",
       "Please make sure that Post-Script is present at the path specified in the config file to ensure "
       "application consistent backup."),
    _e(304, "IncorrectPluginhostFile",
       "The plugin host config file (VMSnapshotPluginHost.conf) is incorrect, so pre-script and post-script "
       "cannot be executed and the backup will not be application consistent.",
       "Fix the file: section [pre_post], integer timeoutInSeconds and numberOfPlugins, and pluginName<i>, "
       "pluginPath<i>, pluginConfigPath<i> for every plugin."),
    _e(305, "IncorrectJSONConfigFile",
       "VMSnapshotScriptPluginConfig.json file is incorrect, so pre-script and post-script cannot be executed "
       "and the backup will not be application consistent.", _JSON_ACTION),
    _e(306, "InsufficientPermissionforPre-Script",
       "For executing scripts, root user should be the owner of the file and file should have \"700\" "
       "permissions i.e. only owner should have \"read\", \"write\", and \"execute\" permissions.", _PERM_ACTION),
    _e(307, "InsufficientPermissionforPost-Script",
       "For executing scripts, root user should be the owner of the file and file should have \"700\" "
       "permissions i.e. only owner should have \"read\", \"write\", and \"execute\" permissions.", _PERM_ACTION),
    _e(308, "Pre-ScriptTimeout", "Execution of Application Consistent Backup Pre-Script timed-out.", _TIMEOUT_ACTION),
    _e(309, "Post-ScriptTimeout", "Execution of Application Consistent Backup Post-Script timed-out.",
       _TIMEOUT_ACTION),
    _e(310, "PluginHostPreTimeout", "The pre-scripts did not all finish within the plugin host's timeout.",
       "Increase timeoutInSeconds in VMSnapshotPluginHost.conf (at most 1800) or make the pre-scripts faster."),
    _e(311, "PluginHostPostTimeout", "The post-scripts did not all finish within the plugin host's timeout.",
       "Increase timeoutInSeconds in VMSnapshotPluginHost.conf (at most 1800) or make the post-scripts faster."),
    _e(312, "CheckSumMismatch", "A plugin file does not match its expected checksum.",
       "Please un-install the VmSnapshotLinux extension; it is re-installed with the next backup."),
    _e(313, "PluginHostConfigNotFound", "The plugin host config file (VMSnapshotPluginHost.conf) was not found.",
       "Create /etc/azure/VMSnapshotPluginHost.conf (owner root, mode 600 or 644) to enable pre- and post-scripts."),
    _e(314, "PluginHostConfigPermissionError",
       "The plugin host config file is writable or executable by group or others.",
       "Run chmod 600 (or 644) on VMSnapshotPluginHost.conf: group and others may at most read it."),
    _e(315, "PluginHostConfigOwnershipError", "The plugin host config file is not owned by root.",
       "Run chown root:root on VMSnapshotPluginHost.conf."),
    _e(316, "PluginConfigNotFound", "The plugin config file (VMSnapshotScriptPluginConfig.json) was not found.",
       "Place VMSnapshotScriptPluginConfig.json at the path pluginConfigPath<i> names (owner root, mode 600)."),
    _e(317, "PluginConfigPermissionError",
       "The plugin config file must have permission 600: only root may read and write it, nobody may execute it.",
       "Run chmod 600 on VMSnapshotScriptPluginConfig.json."),
    _e(318, "PluginConfigOwnershipError", "The plugin config file is not owned by root.",
       "Run chown root:root on VMSnapshotScriptPluginConfig.json."),
    # pyexec's own (the reference has no built-in quiescer): its codes stop at 318 before 402 and 500.
    _e(319, "QuiescerNeedsOneProcess",
       "A built-in database quiescer holds its session in the process that ran the pre-phase; `pluginhost pre` "
       "and `pluginhost post` are separate processes, so the lock or backup would end before the freeze. "
       "Nothing was run.",
       "Run the pre-phase, the snapshot and the post-phase in one process: `pyexec run --snapshot-cmd ...`, "
       "pyexec.run() in Python, or pre_script() and post_script() on one PluginHost object (as the Azure "
       "extension does); or quiesce with your own pre- and post-scripts."),
    # The fleet (pyexec agent, pyexec group run: issue 21's coordination through etcd).
    _e(320, "AgentConfigIncorrect", "The agent config (/etc/pyexec/agent.json) is missing or incorrect, so the "
       "agent cannot take part in group runs.",
       "Fix the key the detail names (docs/fleet.md lists them); the file must be a JSON object owned by root.",
       effect=FATAL),
    _e(321, "AgentConfigPermissionError", "The agent config is not owned by root, or group or others may write it.",
       "Run chown root:root and chmod 600 (or 644) on the agent config; no parent directory may be writable by "
       "anyone but root.", effect=FATAL),
    _e(322, "EtcdUnreachable", "No etcd endpoint answered within the bound, so no group run could be coordinated.",
       "Check the --etcd endpoints, the network to them, and the TLS files (--cacert, --cert, --key).",
       effect=FATAL, exit_status=4),
    _e(323, "GroupHostNotRegistered", "A host of the group has no agent registered in etcd (an unknown name, or "
       "its agent is not running), so nothing was run on any host.",
       "Start `pyexec agent` on that host (systemctl start pyexec-agent), or leave the host out of --hosts.",
       effect=FATAL, exit_status=4),
    _e(324, "GroupAborted", "The group run was aborted: no consistent cut was taken; every host thawed and resumed.",
       "Read the record's reason and the aborting host's report; its scripts' logs say why it could not go on.",
       effect=FATAL, exit_status=4),
    _e(325, "FleetNotInstalled", "The etcd client that group runs need is not installed.",
       "Install the fleet extra: pip install 'pyexec[fleet]'.", effect=FATAL, exit_status=2),
]}


class ErrorDict(TypedDict):
    """An error as report fields (PyexecError.as_dict)."""

    code: int
    name: str
    file: str | None
    key: str | None
    message: str
    detail: str
    action: str


class PyexecError(Exception):
    """An error with a row of the table, the file or key it concerns, and detail."""

    def __init__(self, code: int, detail: str = "", path: str | None = None, key: str | None = None):
        self.entry = TABLE[code]
        self.code = code
        self.detail = detail
        self.path = path
        self.key = key
        super().__init__(self.describe())

    def describe(self) -> str:
        """One line: code, name, where, what."""
        where = self.path or ""
        if self.key:
            where = f"{where}: key {self.key!r}" if where else f"key {self.key!r}"
        parts = [f"{self.code} {self.entry.name}"]
        if where:
            parts.append(where)
        parts.append(self.detail or self.entry.message)
        return ": ".join(parts)

    def as_dict(self) -> ErrorDict:
        """The error as report fields."""
        return {"code": self.code, "name": self.entry.name, "file": self.path, "key": self.key,
                "message": self.entry.message, "detail": self.detail, "action": self.entry.action}


class ConfigError(PyexecError):
    """A config file is missing or unparsable (304, 305, 313, 316)."""


class TrustError(PyexecError):
    """A file's owner or mode is unsafe (306, 307, 314, 315, 317, 318)."""


class ScriptError(PyexecError):
    """A script failed, was not found or timed out (300-303, 308-311)."""


class FreezeError(PyexecError):
    """The freeze could not be done (121, 122, 123)."""

    def __init__(self, code: int, detail: str = "", path: str | None = None, errno: int = 0):
        self.errno = errno
        super().__init__(code, detail, path)


class FreezeTimeout(FreezeError):
    """The window outlived its bound and was thawed by force (code 122); window.py's subclass carries
    the window itself as .window."""

    def __init__(self, detail: str):
        super().__init__(122, detail)


class FreezeNotSupported(FreezeError):
    """The filesystem has no freeze support (EOPNOTSUPP, ENOTTY, ENOSYS): skip it."""


class ForeignFreeze(FreezeError):
    """Someone else holds the filesystem frozen (EBUSY): report it, never thaw it."""


class FreezeDenied(FreezeError):
    """No privilege to freeze (EPERM, EACCES)."""


_FREEZE_KINDS = {
    _errno.EOPNOTSUPP: FreezeNotSupported, _errno.ENOTTY: FreezeNotSupported, _errno.ENOSYS: FreezeNotSupported,
    _errno.EBUSY: ForeignFreeze, _errno.EPERM: FreezeDenied, _errno.EACCES: FreezeDenied,
}


def oserror(err: int, syscall: str, path: str | bytes | None = None) -> OSError:
    """OSError for a negative-errno return of the native core, naming the failing syscall."""
    exc = OSError(err, f"{os.strerror(err)} [{syscall}]", os.fsdecode(path) if path is not None else None)
    setattr(exc, "syscall", syscall)  # noqa: B010 - OSError has no such field: psutil's hint, for a caller to read
    return exc


class Cancelled(Exception):
    """A wait was cut short by its cancel fd (a signal arrived): the process still runs."""


def timed_out(rc: int) -> bool:
    """Whether a native wait or freeze's negative-errno return means its deadline passed."""
    return rc == -_errno.ETIMEDOUT


def wait_outcome(rc: int, syscall: str) -> bool:
    """A native wait's return (px_wait, px_kill_tree): True once the process exited and was reaped
    (0), False at the deadline (ETIMEDOUT, not reaped); Cancelled when its cancel fd woke it
    (ECANCELED, not reaped); OSError for any other -errno."""
    if rc == 0:
        return True
    if timed_out(rc):
        return False
    if rc == -_errno.ECANCELED:
        raise Cancelled()
    raise oserror(-rc, syscall)


def freeze_error(err: int, path: str | None, what: str = "FIFREEZE") -> FreezeError:
    """The freeze exception of the right kind for an errno of a freeze ioctl."""
    cls = _FREEZE_KINDS.get(err, FreezeError)
    return cls(121, f"{what} failed: {os.strerror(err)} (errno {err})", path, errno=err)


def not_frozen(err: int) -> bool:
    """Whether a FITHAW's errno means the filesystem was not frozen (EINVAL): someone thawed it already."""
    return err == _errno.EINVAL


def thawed_by_another(paths: list[str]) -> FreezeError:
    """The error for mounts found thawed inside the window by a FITHAW that was not ours (121)."""
    return FreezeError(121, "thawed by another process inside the window (FITHAW: EINVAL): the window "
                       "did not hold, the snapshot is not consistent", ", ".join(paths), errno=_errno.EINVAL)


def markdown_table() -> str:
    """The error table as Markdown, for README.md (a test keeps the two equal)."""
    rows = ["| code | name | message | recommended action | effect |", "|---|---|---|---|---|"]
    for e in sorted(TABLE.values(), key=lambda e: e.code):
        rows.append(f"| {e.code} | {e.name} | {e.message} | {e.action} | {e.effect} |")
    return "\n".join(rows)
