"""pyexec: application-consistent snapshots on Linux with a minimal, bounded freeze window.

The public API (import it from here, not from the modules):

    with pyexec.freeze(["/data"], timeout=10) as window: ...      # the freeze window
    report = pyexec.run(mount_points=["/data"], snapshot=cmd)     # check, pre, freeze, snapshot, post
    async with pyexec.freeze_async([...]): ...; await pyexec.run_async(...)
    pyexec.check(), pyexec.recover(), pyexec.status()
    record = pyexec.group_run("http://etcd:2379", ["db1", "db2"])  # many hosts, one cut (pyexec[fleet])
"""
from importlib import metadata as _metadata

try:
    __version__ = _metadata.version("pyexec")  # declared once, in pyproject.toml
except _metadata.PackageNotFoundError:  # a source tree that was never installed
    __version__ = "0+unknown"

from pyexec.aio import freeze_async, run_async
from pyexec.errors import (
    ConfigError,
    ForeignFreeze,
    FreezeDenied,
    FreezeError,
    FreezeNotSupported,
    FreezeTimeout,
    PyexecError,
    ScriptError,
    TrustError,
)
from pyexec.host import CheckResult, check, run
from pyexec.host import RunReport as Report
from pyexec.journal import recover, status
from pyexec.steps import ScriptResult
from pyexec.window import MountResult, Window, freeze


def __getattr__(name: str) -> object:
    # The fleet's client (requests, etcd3gw) is imported by the first group run, not by every `pyexec`.
    if name in ("group_run", "group_run_async"):
        from pyexec.fleet import api
        return getattr(api, name)
    raise AttributeError(f"module 'pyexec' has no attribute {name!r}")


__all__ = [
    "CheckResult",
    "ConfigError",
    "ForeignFreeze",
    "FreezeDenied",
    "FreezeError",
    "FreezeNotSupported",
    "FreezeTimeout",
    "MountResult",
    "PyexecError",
    "Report",
    "ScriptError",
    "ScriptResult",
    "TrustError",
    "Window",
    "__version__",
    "check",
    "freeze",
    "freeze_async",
    "group_run",
    "group_run_async",
    "recover",
    "run",
    "run_async",
    "status",
]
